"""`pixelcnn serve`: run the HTTP server with uvicorn. Flags override PIXELCNN_* environment variables."""

from __future__ import annotations

import argparse
import math
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # uvicorn and the app are imported when `pixelcnn serve` runs
    import uvicorn
    from fastapi import FastAPI

    from .settings import Settings


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the models of a model store over HTTP (see /docs once running)")
    p.add_argument(
        "--model-store", type=Path, help="folder of model folders (env PIXELCNN_MODEL_STORE, default model_store)"
    )
    p.add_argument("--model", help="default model (env PIXELCNN_MODEL; default fashion-mnist, else the first)")
    p.add_argument("--preload", choices=["all", "default"], help="load every model or only the default (default all)")
    p.add_argument("--host", help="address to bind (env PIXELCNN_HOST, default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, help="env PIXELCNN_PORT, default 8000")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="env PIXELCNN_DEVICE, default auto")
    p.add_argument("--threads", type=int, help="torch CPU threads per decode lane (env PIXELCNN_THREADS, default 1)")
    p.add_argument(
        "--lanes",
        type=int,
        help="decode lanes per model (env PIXELCNN_LANES; default: 1 on a GPU, "
        "else one per --threads usable CPUs, at most 8)",
    )
    p.add_argument("--max-header-bytes", type=int, help="request head limit, 431 above (default 32768)")
    p.add_argument("--max-header-count", type=int, help="request headers limit, 431 above (default 100)")
    p.add_argument("--header-timeout-s", type=float, help="time to send a request head, 408 after (default 10)")
    p.add_argument("--body-timeout-s", type=float, help="time to send a request body, 408 after (default 30)")
    p.add_argument("--keep-alive-timeout-s", type=float, help="idle connections are closed after (default 5)")
    p.add_argument(
        "--shutdown-timeout-s", type=float, help="on SIGTERM, time running requests get to finish (default 30)"
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with every flag that was given taking precedence."""
    from .settings import Settings

    flags = {
        "model_store": args.model_store,
        "model": args.model,
        "preload": args.preload,
        "host": args.host,
        "port": args.port,
        "device": args.device,
        "threads": args.threads,
        "lanes": args.lanes,
        "max_header_bytes": args.max_header_bytes,
        "max_header_count": args.max_header_count,
        "header_timeout_s": args.header_timeout_s,
        "body_timeout_s": args.body_timeout_s,
        "keep_alive_timeout_s": args.keep_alive_timeout_s,
        "shutdown_timeout_s": args.shutdown_timeout_s,
    }
    return Settings(**{key: value for key, value in flags.items() if value is not None})


# After the drain, connections still open (a client that stopped reading its stream, a body never
# finished) get this long to close before they are cut, so that shutdown always ends.
CLOSE_GRACE_S = 2.0


def draining_server_class() -> Callable[[uvicorn.Config, FastAPI, Settings], uvicorn.Server]:
    import asyncio
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn, with a drain before it stops: the first SIGTERM (or Ctrl-C) runs the registry's drain
        (/ready 503, running requests finish, then the rest end with an error event naming the shutdown),
        then uvicorn's own shutdown, which cuts connections still open CLOSE_GRACE_S later whatever their
        clients do; a second signal stops at once. Exits 0 after a SIGTERM or SIGINT."""

        def __init__(self, config: uvicorn.Config, app: FastAPI, settings: Settings) -> None:
            super().__init__(config)
            self.app, self.settings = app, settings
            self.loop: asyncio.AbstractEventLoop | None = None
            self.drain_task: asyncio.Task | None = None

        def run(self, sockets: list[socket.socket] | None = None) -> None:
            # uvicorn re-raises a caught signal once it has stopped; no-op handlers make that a clean exit.
            signal.signal(signal.SIGTERM, lambda *_: None)
            signal.signal(signal.SIGINT, lambda *_: None)
            super().run(sockets)

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.loop is None:
                return super().handle_exit(sig, frame)
            if self.drain_task is not None or self.should_exit:  # a second signal: stop now
                self.force_exit = self.should_exit = True
                self.loop.call_soon_threadsafe(self._cut_connections)
                return
            self.loop.call_soon_threadsafe(self._start_drain, sig, frame)

        def _start_drain(self, sig: int, frame: FrameType | None) -> None:
            if self.drain_task is not None or self.loop is None:
                return
            drain = self.app.state.registry.drain(self.settings.shutdown_notice_s, self.settings.shutdown_timeout_s)
            self.drain_task = self.loop.create_task(drain)
            self.drain_task.add_done_callback(lambda _: uvicorn.Server.handle_exit(self, sig, frame))

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            if self.drain_task is not None and not self.drain_task.done():
                self.drain_task.cancel()  # stopped at once: the lifespan's shutdown still stops the engines
            cut = asyncio.get_running_loop().call_later(0 if self.force_exit else CLOSE_GRACE_S, self._cut_connections)
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

        def _cut_connections(self) -> None:
            """Close every connection still open: their requests see a disconnect and end."""
            for connection in list(self.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()

    return DrainingServer


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .connections import guarded_protocol

    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        print(f"error: invalid server settings:\n{error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    # access_log=False: the app writes its own access line per request (with its request id, model, images).
    # http: uvicorn's httptools protocol with header limits and timeouts (app/server/connections.py).
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=False,
        http=guarded_protocol(settings.connection_limits(), on_refused=app.state.metrics.count_refused),
        timeout_graceful_shutdown=math.ceil(CLOSE_GRACE_S) + 1,
    )
    draining_server_class()(config, app, settings).run()
    return 0
