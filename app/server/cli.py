"""`pixelcnn serve`: run the HTTP server with uvicorn. Flags override PIXELCNN_* environment variables."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the models of a model store over HTTP (see /docs once running)")
    p.add_argument("--model-store", type=Path,
                   help="folder of model folders (env PIXELCNN_MODEL_STORE, default model_store)")
    p.add_argument("--model", help="default model (env PIXELCNN_MODEL; default fashion-mnist, else the first)")
    p.add_argument("--preload", choices=["all", "default"], help="load every model or only the default (default all)")
    p.add_argument("--host", help="address to bind (env PIXELCNN_HOST, default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--port", type=int, help="env PIXELCNN_PORT, default 8000")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="env PIXELCNN_DEVICE, default auto")
    p.add_argument("--threads", type=int, help="torch CPU threads per decode lane (env PIXELCNN_THREADS, default 1)")
    p.add_argument("--lanes", type=int, help="decode lanes per model (env PIXELCNN_LANES; default: 1 on a GPU, "
                   "else one per --threads usable CPUs, at most 8)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run_serve)


def settings_from_args(args: argparse.Namespace):
    """Settings from the environment, with every flag that was given taking precedence."""
    from .settings import Settings

    flags = {"model_store": args.model_store, "model": args.model, "preload": args.preload,
             "host": args.host, "port": args.port, "device": args.device, "threads": args.threads, "lanes": args.lanes}
    return Settings(**{key: value for key, value in flags.items() if value is not None})


def run_serve(args: argparse.Namespace) -> int:
    import logging

    import uvicorn
    from pydantic import ValidationError

    from .app import create_app

    try:
        settings = settings_from_args(args)
    except ValidationError as error:
        print(f"error: invalid server settings:\n{error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # access_log=False: the app writes its own access line per request (with its request id, model, images).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level,
                access_log=False)
    return 0
