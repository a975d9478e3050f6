"""The models being served: discovered in the model store, loaded in the background once the server
listens (`load_and_start`), each behind an Engine.

Loading never raises: a model that cannot be loaded is recorded as a problem, so the server still
starts, /health answers and /ready explains in words why it is not ready (503 "loading models" while
the load runs).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from app.model import ModelConfig, PixelCNNModel, pick_device
from app.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE

from .errors import NotFound, NotReady, shown
from .model_store import missing_store_hint
from .settings import DEFAULT_MODEL, Settings

if TYPE_CHECKING:
    from app.engine import Engine

log = logging.getLogger("pixelcnn.server")

EngineFactory = Callable[[PixelCNNModel, Settings], "Engine"]  # (a loaded model, the settings) -> its engine


def default_engine_factory(model: PixelCNNModel, settings: Settings) -> Engine:
    from app.engine import Engine

    lanes = settings.lanes_for(next(model.parameters()).device.type)
    return Engine(
        model,
        max_batch_images=settings.max_batch_images,
        max_queue=settings.max_queue,
        lanes=lanes,
        step_images=settings.step_images,
        batch_wait_s=settings.batch_wait_ms / 1000,
        fault_every_steps=settings.fault_every_steps,
        wavefront=None,  # measured at start: one image by wavefront only where that is faster here
        scoring_nice=settings.scoring_nice,
    )


@dataclass
class ServedModel:
    name: str
    path: Path
    config: ModelConfig
    engine: Engine
    parameters: int
    metrics: dict | None  # metrics.json without its long training history

    @property
    def numerics(self) -> str:
        """The engine's numerics fingerprint (RowLoop.numerics), sent with every generation."""
        return self.engine.numerics

    def class_name(self, label: int | None) -> str | None:
        return None if label is None else self.config.class_name(label)

    def describe(self, default: bool) -> dict[str, object]:
        c = self.config
        return {
            "name": self.name,
            "arch": c.arch,
            "shape": list(c.shape),
            "conditional": c.conditional,
            "classes": [{"index": i, "name": self.class_name(i)} for i in range(c.num_classes)],
            "parameters": self.parameters,
            "metrics": self.metrics,
            "default": default,
            # metrics.json may say what a model is for: "role": "baseline" marks one shipped only to compare.
            "baseline": (self.metrics or {}).get("role") == "baseline",
            "note": (self.metrics or {}).get("note"),
        }


@dataclass
class ModelRegistry:
    models: dict[str, ServedModel] = field(default_factory=dict)
    default: str | None = None
    problems: list[str] = field(default_factory=list)
    draining: str | None = None  # set on shutdown: /ready turns 503 and new work is refused with it
    loading: bool = False  # true until load_and_start has loaded the models and started their engines

    @property
    def not_ready_reason(self) -> str | None:
        """None when ready: the default model is loaded and every engine is running."""
        if self.draining:
            return self.draining
        if self.loading:
            return "loading models"
        if not self.models:
            return "; ".join(self.problems) or "no model is loaded"
        if self.default not in self.models:
            return "; ".join(self.problems) or f"the default model {self.default!r} is not loaded"
        stopped = [m.name for m in self.models.values() if not m.engine.running]
        if stopped:
            return f"engine not running for {', '.join(stopped)}"
        return None

    def get(self, name: str | None) -> ServedModel:
        """The named model, or the default; 404 naming what is available."""
        if self.draining:
            raise NotReady(f"{self.draining}; retry on another replica")
        if self.loading:
            raise NotReady("the server is still loading its models; retry shortly or on another replica")
        if not self.models:
            raise NotReady(f"no model is loaded: {self.not_ready_reason}")
        wanted = name if name is not None else self.default
        if wanted in self.models:
            return self.models[wanted]
        available = ", ".join(sorted(self.models))
        if name is None:
            raise NotFound(
                f'the default model {wanted!r} is not loaded; pass "model", one of: {available}', field="model"
            )
        raise self.unknown_model(name)

    def unknown_model(self, name: str) -> NotFound:
        """The 404 for a model name that is not loaded, naming those that are."""
        return NotFound(
            f"unknown model {shown(name)}; available models: {', '.join(sorted(self.models))}", field="model"
        )

    async def start(self) -> None:
        for model in list(self.models.values()):
            try:
                await model.engine.start()
            except Exception as error:  # one broken engine must not take the others down
                log.exception("engine for %s failed to start", model.name)
                self.problems.append(f"{model.name}: engine failed to start ({error})")
                del self.models[model.name]

    def busy(self) -> bool:
        """Any generation waiting or running, or likelihood pass in flight, in any engine."""
        for model in self.models.values():
            stats = model.engine.stats()
            if stats.queue_size or stats.active_requests or stats.likelihood_in_flight:
                return True
        return False

    async def drain(self, notice_s: float, timeout_s: float) -> None:
        """Graceful shutdown: refuse new work at once (/ready 503 so a gateway stops sending), give the
        gateway `notice_s` to notice, let running requests finish for up to `timeout_s` in all, then stop
        the engines, which ends what is left with an error naming the shutdown."""
        self.draining = "the server is shutting down"
        log.info("draining: /ready is 503; waiting up to %.0f s for running requests", timeout_s)
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(min(notice_s, timeout_s))
        while self.busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.busy():
            log.warning("drain timeout: ending the requests still running")
        await self.stop()

    async def stop(self) -> None:
        for model in self.models.values():
            try:
                await model.engine.stop()
            except Exception:
                log.exception("engine for %s failed to stop", model.name)


def discover(store: Path) -> list[str]:
    """Model folders in the store: every sub-folder with a config.json, sorted by name."""
    if not store.is_dir():
        return []
    return sorted(p.name for p in store.iterdir() if (p / CONFIG_FILE).is_file())


def default_model_name(settings: Settings, names: list[str]) -> str | None:
    if settings.model:
        return settings.model
    if DEFAULT_MODEL in names:
        return DEFAULT_MODEL
    return names[0] if names else None


def read_metrics(folder: Path) -> dict | None:
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log.warning("%s: unreadable (%s)", path, error)
        return None
    return {k: v for k, v in metrics.items() if k != "history"} if isinstance(metrics, dict) else None


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: PixelCNNModel  # in eval mode
    metrics: dict | None


def load_models(settings: Settings) -> tuple[list[LoadedModel], str | None, list[str]]:
    """Blocking (torch) part of startup, run in a worker thread: (loaded models, default name, problems).
    It also builds the engines' C row kernel if this machine has not yet (a second or so of compiling,
    which must not hold up the event loop; see app/engine/c_library.py)."""
    from app.engine.c_library import load_kernel
    from app.model import load

    load_kernel()

    store = settings.model_store
    names = discover(store)
    default = default_model_name(settings, names)
    if not names:
        why = "does not exist" if not store.is_dir() else f"has no model folder (with {CONFIG_FILE} and {WEIGHTS_FILE})"
        return [], default, [f"the model store {str(store)!r} {why}: {missing_store_hint(store)}"]
    problems = []
    if default not in names:
        problems.append(
            f"the default model {default!r} is not in the model store {str(store)!r} (found: {', '.join(names)})"
        )
    try:
        device = pick_device(settings.device)
    except ValueError as error:
        return [], default, [str(error)]
    wanted = names if settings.preload == "all" else [n for n in names if n == default]
    loaded = []
    for name in wanted:
        try:
            model = load(store / name, device)
        except Exception as error:  # a broken folder is reported, the others still load
            log.exception("could not load %s", name)
            problems.append(f"{name}: could not be loaded ({error})")
            continue
        loaded.append(LoadedModel(name, store / name, model, read_metrics(store / name)))
        log.info("loaded %s on %s", name, device)
    return loaded, default, problems


def build_registry(
    loaded: list[LoadedModel], default: str | None, problems: list[str], settings: Settings, factory: EngineFactory
) -> ModelRegistry:
    """Wrap each loaded model in an engine (on the event loop thread, where engines will run)."""
    registry = ModelRegistry(default=default, problems=list(problems))
    for item in loaded:
        try:
            engine = factory(item.model, settings)
        except Exception as error:
            log.exception("could not build an engine for %s", item.name)
            registry.problems.append(f"{item.name}: engine could not be created ({error})")
            continue
        parameters = sum(p.numel() for p in item.model.parameters())
        registry.models[item.name] = ServedModel(
            item.name, item.path, item.model.config, engine, parameters, item.metrics
        )
    return registry


async def load_and_start(registry: ModelRegistry, settings: Settings, factory: EngineFactory) -> None:
    """Fill `registry` in place (the drain on SIGTERM holds the same object) and start its engines, then
    clear `loading`. Run as a task once the server listens, so /health answers during the load. Any
    failure ends up in `problems`, which /ready reports. Cancelled (shutdown during the load), it leaves
    the torch load to finish in its thread and drops the result; whatever engine started is in
    `registry.models`, so the lifespan's `registry.stop()` stops it."""
    try:
        # torch loading blocks for seconds: keep it off the event loop thread.
        loaded, default, problems = await anyio.to_thread.run_sync(load_models, settings, abandon_on_cancel=True)
        built = build_registry(loaded, default, problems, settings, factory)
        registry.models, registry.default, registry.problems = built.models, built.default, built.problems
        await registry.start()
    except Exception as error:  # e.g. torch itself failing: say so in /ready instead of "loading" forever
        log.exception("loading the models failed")
        registry.problems.append(f"loading the models failed ({type(error).__name__}: {error})")
    finally:
        registry.loading = False
    # What exists now (modules, the models, the app's routes) lives as long as the process: the collector's
    # full passes leave it alone from here, instead of walking all of it while the event loop waits (gen-2
    # passes of 50-75 ms under a flood, 8 ms once frozen; BENCHMARKS.md).
    gc.freeze()
    for problem in registry.problems:
        log.warning("%s", problem)
    log.info("serving %s (default %s)", ", ".join(sorted(registry.models)) or "no model", registry.default)
    if registry.models:
        url = browser_url(settings.host, settings.port)
        log.info("ready: the web demo is at %s and the API docs at %sdocs", url, url)


def browser_url(host: str, port: int) -> str:
    """The address a person on this machine opens: a wildcard bind (0.0.0.0, ::) is reached via loopback."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"
