"""Where `pixelcnn serve` looks for models when it is not told: the current folder's `model_store`, else the
one shipped beside the package (a checkout, or an editable install of one), so that the server started
from any folder serves the shipped models."""

from __future__ import annotations

from pathlib import Path

STORE_NAME = "model_store"
# app/server/model_store.py -> the folder holding `app`: the checkout (or the site-packages folder).
SHIPPED_STORE = Path(__file__).resolve().parent.parent.parent / STORE_NAME


def store_candidates() -> list[Path]:
    """The folders tried in order when no model store is configured (duplicates removed)."""
    candidates = [Path(STORE_NAME), SHIPPED_STORE]
    return [
        path for index, path in enumerate(candidates) if path.resolve() not in {c.resolve() for c in candidates[:index]}
    ]


def default_model_store() -> Path:
    """The first candidate that is a folder; the relative `model_store` when none is (reported at startup)."""
    return next((path for path in store_candidates() if path.is_dir()), Path(STORE_NAME))


def missing_store_hint(store: Path) -> str:
    """One line: where the server looked and how to point it elsewhere."""
    tried = [store] if store != Path(STORE_NAME) else store_candidates()
    looked = " and ".join(repr(str(path.resolve())) for path in tried)
    return f"looked in {looked}; pass --model-store DIR or set PIXELCNN_MODEL_STORE=DIR (a folder of model folders)"
