"""CIFAR-10 "python version" batches: pickled dicts of numpy arrays, read without trusting the pickle."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from app.data.dataset import DatasetNotFoundError, ImageDataset, build_dataset

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
META_FILE = "batches.meta"
HOW_TO_GET = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "unpack it and pass --data-dir DIR/cifar-10-batches-py"
)

# numpy pickles arrays as _reconstruct(ndarray, shape, dtype) + __setstate__; the module name moved in numpy 2.
_RECONSTRUCT = np.ndarray(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A pickle asked for a global outside the numpy allow-list; a ValueError too, so callers treat it as bad data."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and plain containers, and nothing else.

    A pickle can name any importable callable (os.system, ...) and have it called while loading; refusing every
    global except numpy's array reconstruction means a downloaded batch file cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load {module}.{name} from a dataset pickle") from None


def load_pickle(path: Path) -> Any:
    """Read one CIFAR pickle; encoding="bytes" because the files were written by Python 2 (keys are bytes)."""
    with path.open("rb") as f:
        try:
            return NumpyOnlyUnpickler(f, encoding="bytes").load()
        except UnsafePickleError as error:
            raise UnsafePickleError(f"{path}: {error}") from None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 images (N, 3, 32, 32), labels (N,))."""
    batch = load_pickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (expected a dict with b'data' and b'labels')")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' should be a uint8 array of shape (N, 3072)")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"], dtype=np.int64)


def read_class_names(folder: Path) -> list[str] | None:
    """Names from batches.meta; the file is optional because the batches alone are enough to train."""
    path = folder / META_FILE
    if not path.is_file():
        return None
    meta = load_pickle(path)
    return [name.decode() for name in meta[b"label_names"]]


def load_cifar10(folder: Path, split: str, limit: int | None) -> ImageDataset:
    """Concatenate the split's batches in file order, so the first `limit` images are always the same ones."""
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    for file_name in names:
        if not (folder / file_name).is_file():
            raise DatasetNotFoundError(f"cifar10 not found in {folder} (looked for {file_name}); {HOW_TO_GET}")
    images, labels = [], []
    for file_name in names:
        batch_images, batch_labels = read_batch(folder / file_name)
        images.append(batch_images)
        labels.append(batch_labels)
        if limit is not None and sum(map(len, images)) >= limit:
            break
    return build_dataset("cifar10", np.concatenate(images), np.concatenate(labels), read_class_names(folder), limit)
