"""Every `pixelcnn` verb (bench verbs and card included) describes itself and each of its options in --help."""

from __future__ import annotations

import argparse
import importlib

import pytest

from app import cli


class Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def forwarded_parser(module: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser a forwarded verb's module builds in run(argv), caught as it parses."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as caught:
        importlib.import_module(module).run([])
    monkeypatch.undo()
    return caught.value.parser


def verb_parsers(monkeypatch: pytest.MonkeyPatch) -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="pixelcnn")
    sub = parser.add_subparsers(dest="command")
    from app.server.cli import add_serve

    for add in (cli.add_train, cli.add_eval, cli.add_sample, cli.add_complete, add_serve):
        add(sub)
    parsers = dict(sub.choices)
    for name, (module, _) in cli.BENCH_VERBS.items():
        parsers[f"bench {name}"] = forwarded_parser(module, monkeypatch)
    parsers["card"] = forwarded_parser(cli.CARD[0], monkeypatch)
    return parsers


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options and positionals whose --help line says nothing about them."""
    return [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]


def test_every_verb_and_every_option_is_described_in_help(monkeypatch):
    parsers = verb_parsers(monkeypatch)
    assert {"train", "eval", "sample", "complete", "serve", "bench model", "bench scale", "card"} <= set(parsers)
    missing = {name: undocumented(parser) for name, parser in parsers.items()}
    assert not {name: options for name, options in missing.items() if options}
    assert all((parser.description or "").strip() for parser in parsers.values()), [
        name for name, parser in parsers.items() if not (parser.description or "").strip()
    ]
