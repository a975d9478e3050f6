"""NumPy .npz archives: Keras layout (x_train, y_train, x_test, y_test) or a single images/labels pair."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.data.dataset import ImageDataset, build_dataset, split_indices


def to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); channels-last (N, H, W, 1|3) -> (N, C, H, W); (N, 1|3, H, W) is kept."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    if images.ndim == 4 and images.shape[3] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    raise ValueError(f"{path}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W), C 1 or 3; got {images.shape}")


def to_uint8(images: np.ndarray, path: Path) -> np.ndarray:
    """Accept uint8, or any integer array whose values fit 0..255; floats are refused rather than guessed at."""
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.integer):
        raise ValueError(f"{path}: images must be uint8 or integers in 0..255; got dtype {images.dtype}")
    if images.size and (images.min() < 0 or images.max() > 255):
        raise ValueError(
            f"{path}: images must be uint8 or integers in 0..255; got values {images.min()}..{images.max()}"
        )
    return images.astype(np.uint8)


def to_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels as (N,); Keras ships some as (N, 1)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers; got dtype {labels.dtype}")
    return labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels


def pick_split(archive: np.lib.npyio.NpzFile, path: Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images, labels or None) of `split`, from the Keras keys or by splitting images/labels every 10th item."""
    keys = set(archive.files)
    if "x_train" in keys or "x_test" in keys:
        image_key, label_key = f"x_{split}", f"y_{split}"
        if image_key not in keys:
            raise ValueError(f"{path} has no {image_key!r} array (keys: {', '.join(sorted(keys))})")
        return archive[image_key], archive[label_key] if label_key in keys else None
    if "images" in keys:
        images = archive["images"]
        labels = archive["labels"] if "labels" in keys else None
        index = split_indices(len(images), split)
        return images[index], None if labels is None else labels[index]
    raise ValueError(
        f"{path}: expected arrays x_train/y_train/x_test/y_test or images/labels; found {', '.join(sorted(keys))}"
    )


def class_names_of(archive: np.lib.npyio.NpzFile) -> list[str] | None:
    """An optional `class_names` string array, else "0".."K-1" with K = 1 + the largest label of any split."""
    keys = set(archive.files)
    if "class_names" in keys:
        return [str(name) for name in archive["class_names"]]
    labels = [archive[key] for key in ("y_train", "y_test", "labels") if key in keys and archive[key].size]
    return [str(i) for i in range(1 + max(int(a.max()) for a in labels))] if labels else None


def load_npz(path: Path, split: str, limit: int | None) -> ImageDataset:
    """Load one split; allow_pickle=False so an .npz cannot smuggle in object arrays (arbitrary pickles)."""
    with np.load(path, allow_pickle=False) as archive:
        images, labels = pick_split(archive, path, split)
        class_names = None if labels is None else class_names_of(archive)
    images = to_uint8(to_nchw(images[:limit], path), path)
    labels = None if labels is None else to_labels(labels[:limit], path)
    return build_dataset(path.stem, images, labels, class_names, None)
