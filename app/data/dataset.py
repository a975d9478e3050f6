"""The in-memory dataset type and the helpers every source shares."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

SPLITS = ("train", "test")
TEST_EVERY = 10  # sources without their own split put every 10th item in "test"


@dataclass
class ImageDataset:
    """A whole split held in memory: small image sets fit easily and training needs random access."""

    name: str
    images: torch.Tensor  # uint8, (N, C, H, W), C in {1, 3}
    labels: torch.Tensor | None  # int64 (N,), or None when the source has no labels
    class_names: list[str] | None  # label index -> human name

    def __len__(self) -> int:
        return self.images.shape[0]


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are absent; the message is one line saying what, where and how to get it.
    A FileNotFoundError, so that `pixelcnn` reports it without importing this (torch) module on every verb."""


def check_split(split: str) -> None:
    """Reject a split name early, before any file is read."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")


def split_indices(count: int, split: str) -> np.ndarray:
    """Indices of `split` for a source with no split of its own: every 10th item (9, 19, ...) is test.

    Interleaving rather than cutting off the tail keeps both splits spread over sorted class folders.
    """
    is_test = np.arange(count) % TEST_EVERY == TEST_EVERY - 1
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def build_dataset(
    name: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    class_names: list[str] | None,
    limit: int | None,
) -> ImageDataset:
    """Check the arrays against the ImageDataset contract, keep the first `limit` items and copy into torch.

    Copying (torch.tensor) matters: sources hand over read-only buffers or views of much larger arrays.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 images of shape (N, 1|3, H, W); got {images.dtype} {images.shape}")
    if labels is not None and labels.shape != (images.shape[0],):
        raise ValueError(f"{name}: {images.shape[0]} images but labels of shape {labels.shape}")
    if limit is not None:
        images = images[:limit]
        labels = None if labels is None else labels[:limit]
    return ImageDataset(
        name=name,
        images=torch.tensor(images),
        labels=None if labels is None else torch.tensor(labels, dtype=torch.int64),
        class_names=class_names,
    )


def iterate_batches(
    ds: ImageDataset,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (uint8 images, labels or None) batches; the order comes from `generator` so a seed replays it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    count = len(ds)
    order = torch.randperm(count, generator=generator) if shuffle else torch.arange(count)
    stop = count - count % batch_size if drop_last else count
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield ds.images[index], None if ds.labels is None else ds.labels[index]
