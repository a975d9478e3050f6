"""A folder of image files, optionally one subfolder per class and optionally pre-split into train/ and test/."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.data.dataset import (
    DatasetNotFoundError,
    ImageDataset,
    build_dataset,
    split_indices,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
GRAY_MODES = {"1", "L", "LA"}


@dataclass(frozen=True)
class ImageFile:
    """One image file and its class (its subfolder's name), or None in an unlabeled folder."""

    path: Path
    class_name: str | None


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted so every load sees the same order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(folder: Path) -> list[Path]:
    """Subfolders that name classes; hidden ones (.ipynb_checkpoints, ...) are not classes."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def collect(folder: Path) -> list[ImageFile]:
    """Files of one (split) folder: with subfolders, each is a class; otherwise the files themselves, unlabeled."""
    subfolders = class_folders(folder)
    if not subfolders:
        return [ImageFile(path, None) for path in list_images(folder)]
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise ValueError(
            f"{folder} mixes class subfolders with loose images such as {loose[0].name}; use one or the other"
        )
    return [ImageFile(path, sub.name) for sub in subfolders for path in list_images(sub)]


def is_gray(image: Image.Image) -> bool:
    """True for grayscale files, and for palette files whose used colours are all gray."""
    if image.mode in GRAY_MODES:
        return True
    if image.mode != "P":
        return False
    palette = image.getpalette() or []
    used = image.getcolors(maxcolors=256) or []
    return all(len(set(palette[3 * index : 3 * index + 3])) <= 1 for _, index in used)


def check_files(files: list[ImageFile]) -> str:
    """Verify one shared size and pick the PIL mode all files are converted to: "L" if every file is gray, else "RGB".

    Checked over the whole dataset, not one split, so both splits get the same shape and channel count.
    """
    expected: tuple[int, int] | None = None
    all_gray = True
    for file in files:
        with Image.open(file.path) as image:
            if expected is None:
                expected = image.size
            elif image.size != expected:
                raise ValueError(
                    f"{file.path}: image size {image.size[0]}x{image.size[1]} differs from the expected "
                    f"{expected[0]}x{expected[1]} (size of {files[0].path.name})"
                )
            all_gray = all_gray and is_gray(image)
    return "L" if all_gray else "RGB"


def read_images(files: list[ImageFile], mode: str) -> np.ndarray:
    """Decode and convert to `mode` (colour -> RGB, alpha dropped), stacked as uint8 (N, C, H, W)."""
    arrays = []
    for file in files:
        with Image.open(file.path) as image:
            arrays.append(np.asarray(image.convert(mode)))
    stacked = np.stack(arrays)
    return stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)


def split_files(folder: Path, split: str) -> tuple[list[ImageFile], list[ImageFile]]:
    """(files of this split, files of the whole dataset), using train/ and test/ when the folder has both."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        splits = {name: collect(folder / name) for name in ("train", "test")}
        return splits[split], splits["train"] + splits["test"]
    everything = collect(folder)
    return [everything[i] for i in split_indices(len(everything), split)], everything


def load_image_folder(folder: Path, split: str, limit: int | None) -> ImageDataset:
    """Load one split of an image folder; the dataset is named after the folder.

    Every file is converted to one mode so the images stack: grayscale ("L", C=1) when all files are grayscale
    or palette images with gray colours only, otherwise RGB (C=3); alpha channels are dropped.
    """
    if not folder.is_dir():
        raise DatasetNotFoundError(f"image folder {folder} does not exist")
    files, everything = split_files(folder, split)
    if not everything:
        suffixes = "/".join(sorted(IMAGE_SUFFIXES))
        raise DatasetNotFoundError(f"no images ({suffixes}) found in {folder}")
    if not files:
        raise ValueError(f"{folder} has no images in its {split!r} split")
    if len({f.class_name is None for f in everything}) > 1:
        raise ValueError(f"{folder}: train/ and test/ must both use class subfolders, or neither")
    mode = check_files(everything)
    class_names = sorted({f.class_name for f in everything if f.class_name is not None}) or None
    files = files[:limit]
    labels = None
    if class_names is not None:
        label_of = {name: index for index, name in enumerate(class_names)}
        labels = np.array([label_of[f.class_name] for f in files], dtype=np.int64)
    return build_dataset(folder.name, read_images(files, mode), labels, class_names, None)
