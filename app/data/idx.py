"""IDX files (the MNIST family's format): a big-endian magic and shape header, then raw uint8 data."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from app.data.dataset import DatasetNotFoundError, ImageDataset, build_dataset

IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions (N, H, W)
LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension (N,)

# split -> (images file, labels file), without the optional .gz
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (gzip when it ends in .gz) into a read-only array without copying the payload."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    found = int.from_bytes(data[:4], "big")
    if len(data) < 4 or found != magic:
        raise ValueError(f"{path}: bad IDX magic number {found}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(data) != header + size:
        raise ValueError(f"{path}: IDX header promises {shape} = {size} bytes but the file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(shape)


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """The gzip'd file if present, else the plain one, else None."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(
    name: str,
    folder: Path,
    split: str,
    limit: int | None,
    class_names: list[str],
    how_to_get: str,
) -> ImageDataset:
    """Load one split of an MNIST-style folder; `how_to_get` ends the not-found message."""
    paths = []
    for stem in IDX_FILES[split]:
        path = find_idx_file(folder, stem)
        if path is None:
            raise DatasetNotFoundError(f"{name} not found in {folder} (looked for {stem}[.gz]); {how_to_get}")
        paths.append(path)
    images = read_idx(paths[0], IMAGES_MAGIC)
    labels = read_idx(paths[1], LABELS_MAGIC)
    return build_dataset(name, images[:, None], labels, class_names, limit)
