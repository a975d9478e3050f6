"""HTTP serving layer: `create_app(Settings(...))`, run by `pixelcnn serve`.

Exports are lazy so that `app.server.cli` (imported by `pixelcnn --help`) does not pull in torch/FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)
