"""`load_dataset`: turn a dataset name (or a path) into the loader for that source."""

from __future__ import annotations

from pathlib import Path

from app.data.cifar import HOW_TO_GET as CIFAR_HOW_TO_GET
from app.data.cifar import load_cifar10
from app.data.dataset import DatasetNotFoundError, ImageDataset, check_split
from app.data.folder import load_image_folder
from app.data.idx import IDX_FILES, load_idx_dataset
from app.data.npz import load_npz

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(digit) for digit in range(10)]
MNIST_FILES = ", ".join(f"{stem}.gz" for pair in IDX_FILES.values() for stem in pair)
MNIST_HOW_TO_GET = f"put the four MNIST IDX files ({MNIST_FILES}, gzip'd or not) in a folder and pass --data-dir DIR"
ACCEPTED_NAMES = (
    "fashion-mnist, mnist (with --data-dir), cifar10 (with --data-dir), folder (with --data-dir), "
    "a path to an image folder, or a path to a .npz file"
)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    limit: int | None = None,
) -> ImageDataset:
    """Load one split of a dataset into memory as uint8 (N, C, H, W) images.

    `name` is fashion-mnist, mnist, cifar10, folder, or a path to an image folder or .npz file. `data_dir` is
    the folder of a named source (required for mnist, cifar10 and folder); `limit` keeps the first N images.
    """
    check_split(split)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images; got {limit}")
    folder = None if data_dir is None else Path(data_dir).expanduser()
    if name == "fashion-mnist":
        how_to_get = "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR"
        return load_idx_dataset(name, folder or FASHION_MNIST_DIR, split, limit, FASHION_MNIST_CLASSES, how_to_get)
    if name == "mnist":
        mnist_dir = require_dir(name, folder, MNIST_HOW_TO_GET)
        return load_idx_dataset(name, mnist_dir, split, limit, MNIST_CLASSES, MNIST_HOW_TO_GET)
    if name == "cifar10":
        return load_cifar10(require_dir(name, folder, CIFAR_HOW_TO_GET), split, limit)
    if name == "folder":
        return load_image_folder(require_dir(name, folder, "point it at a folder of images"), split, limit)
    return load_path(name, folder, split, limit)


def require_dir(name: str, folder: Path | None, what: str) -> Path:
    """The data_dir of a source that has no default location, or a one-line error saying what to pass."""
    if folder is None:
        raise DatasetNotFoundError(f"{name} needs --data-dir DIR; {what}")
    return folder


def load_path(name: str, folder: Path | None, split: str, limit: int | None) -> ImageDataset:
    """Treat `name` as a path: a .npz file or a folder of images. Anything else is an unknown name."""
    path = Path(name).expanduser()
    if not looks_like_path(name, path):
        raise DatasetNotFoundError(f"unknown dataset {name!r}; accepted: {ACCEPTED_NAMES}")
    if folder is not None:
        raise ValueError(f"dataset {name!r} is a path, so --data-dir {folder} would be ignored; pass only one of them")
    if not path.exists():
        raise DatasetNotFoundError(f"no such file or folder: {path} (dataset names: {ACCEPTED_NAMES})")
    if path.is_dir():
        return load_image_folder(path, split, limit)
    if path.suffix == ".npz":
        return load_npz(path, split, limit)
    raise DatasetNotFoundError(f"{path} is neither a folder of images nor a .npz file")


def looks_like_path(name: str, path: Path) -> bool:
    """A name is a path if it exists or is written like one; a bare word is a misspelt dataset name."""
    return path.exists() or "/" in name or name.startswith((".", "~")) or path.suffix == ".npz"
