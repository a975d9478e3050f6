"""Tests for the dataset layer: every source is built in tmp_path, except the optional real Fashion-MNIST check."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.data import DatasetNotFoundError, ImageDataset, iterate_batches, load_dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """Write an IDX file: big-endian magic, big-endian dimensions, raw uint8 data; gzip'd for a .gz name."""
    data = struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_idx_folder(folder: Path, gz: bool, count: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Both splits of a tiny MNIST-style folder; returns the train images and labels."""
    folder.mkdir(exist_ok=True)
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % 10
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, 2049)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = write_idx_folder(tmp_path / "mnist", gz)
    ds = load_dataset("mnist", data_dir=str(tmp_path / "mnist"))
    assert isinstance(ds, ImageDataset)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels is not None and ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == labels.tolist()
    assert ds.class_names == [str(d) for d in range(10)]


def test_fashion_mnist_data_dir_and_limit(tmp_path: Path) -> None:
    images, _ = write_idx_folder(tmp_path, gz=True)
    ds = load_dataset("fashion-mnist", split="test", data_dir=str(tmp_path), limit=3)
    assert ds.images.shape == (3, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images[:3]))
    assert ds.class_names is not None and ds.class_names[0] == "T-shirt/top" and len(ds.class_names) == 10


def test_idx_bad_magic(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4), np.uint8), 2049)
    with pytest.raises(ValueError, match="magic"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_missing_folder_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=str(missing))
    message = str(info.value)
    assert str(missing) in message and "train-images-idx3-ubyte" in message and "\n" not in message


def test_mnist_requires_data_dir() -> None:
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_dataset("mnist")


def test_unknown_name_lists_accepted_names() -> None:
    with pytest.raises(DatasetNotFoundError, match="fashion-mnist.*cifar10"):
        load_dataset("imagenet")


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="no such file"):
        load_dataset(str(tmp_path / "absent.npz"))


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="'train', 'test'"):
        load_dataset("fashion-mnist", split="val")


def write_cifar(folder: Path, per_batch: int = 4) -> None:
    """A CIFAR-10 python folder in the original layout (pickled dicts with bytes keys).

    Protocol 4, not 2: under Python 3, protocol 2 pickles bytes through _codecs.encode, a global the loader
    refuses; the original Python 2 files and protocol 4 both store bytes natively.
    """
    folder.mkdir(exist_ok=True)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    for number, name in enumerate(names):
        data = np.full((per_batch, 3072), number, dtype=np.uint8)
        data[:, 1024:] = 200  # green and blue planes differ from red, to catch a wrong reshape
        batch = {b"batch_label": name.encode(), b"data": data, b"labels": [number] * per_batch}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))


def test_cifar_batches(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    train = load_dataset("cifar10", data_dir=str(tmp_path))
    assert train.images.shape == (20, 3, 32, 32)
    assert train.labels is not None and train.labels.tolist() == [n for n in range(5) for _ in range(4)]
    assert train.images[4, 0].unique().tolist() == [1] and train.images[4, 1:].unique().tolist() == [200]
    assert train.class_names == ["airplane", "automobile"]
    test = load_dataset("cifar10", split="test", data_dir=str(tmp_path), limit=2)
    assert test.images.shape == (2, 3, 32, 32) and test.labels.tolist() == [5, 5]


class RunsShell:
    """Pickles to os.system(...): loading it with plain pickle would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_unsafe_pickle(tmp_path: Path) -> None:
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    batch = {b"data": RunsShell(marker), b"labels": [0]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_dataset("cifar10", split="test", data_dir=str(tmp_path))
    assert not marker.exists()


def save_image(path: Path, size: tuple[int, int], mode: str = "L", value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, color).save(path)


def test_image_folder_with_classes(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    for index in range(12):
        save_image(root / "cats" / f"{index:02d}.png", (8, 6), value=index)
    for index in range(8):
        save_image(root / "birds" / f"{index:02d}.bmp", (8, 6), value=100 + index)
    train = load_dataset(str(root))
    test = load_dataset("folder", split="test", data_dir=str(root))
    assert train.name == "shapes"
    assert train.class_names == ["birds", "cats"]
    assert train.images.shape == (18, 1, 6, 8) and test.images.shape == (2, 1, 6, 8)
    # sorted order: birds/00..07, cats/00..11; items 9 and 19 (cats/01, cats/11) are test
    assert test.labels.tolist() == [1, 1] and test.images[:, 0, 0, 0].tolist() == [1, 11]
    assert train.labels.tolist() == [0] * 8 + [1] * 10


def test_image_folder_rgb_and_train_test_dirs(tmp_path: Path) -> None:
    save_image(tmp_path / "train" / "a.png", (4, 4), value=10)
    save_image(tmp_path / "train" / "b.png", (4, 4), mode="RGB", value=20)
    save_image(tmp_path / "test" / "c.png", (4, 4), value=30)
    train = load_dataset(str(tmp_path))
    test = load_dataset(str(tmp_path), split="test")
    assert train.labels is None and train.class_names is None
    assert train.images.shape == (2, 3, 4, 4) and test.images.shape == (1, 3, 4, 4)
    assert train.images[1, :, 0, 0].tolist() == [20, 0, 235]
    assert test.images[0, :, 0, 0].tolist() == [30, 30, 30]


def test_image_folder_size_mismatch(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", (8, 8))
    save_image(tmp_path / "b.png", (8, 9))
    with pytest.raises(ValueError, match=r"b\.png.*8x9.*8x8"):
        load_dataset(str(tmp_path))


def test_npz_keras_layout(tmp_path: Path) -> None:
    path = tmp_path / "digits.npz"
    x_train = np.arange(5 * 4 * 4 * 3).reshape(5, 4, 4, 3) % 256
    np.savez(path, x_train=x_train, y_train=np.arange(5)[:, None], x_test=x_train[:2], y_test=np.arange(2))
    ds = load_dataset(str(path))
    assert ds.name == "digits" and ds.images.dtype == torch.uint8 and ds.images.shape == (5, 3, 4, 4)
    assert torch.equal(ds.images, torch.from_numpy(x_train.transpose(0, 3, 1, 2).astype(np.uint8)))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]
    assert load_dataset(str(path), split="test").images.shape == (2, 3, 4, 4)


def test_npz_images_labels_layout(tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    images = np.arange(25, dtype=np.uint8)[:, None, None].repeat(6, 1).repeat(6, 2)
    np.savez(path, images=images, labels=np.arange(25))
    train = load_dataset(str(path), limit=4)
    test = load_dataset(str(path), split="test")
    assert train.images.shape == (4, 1, 6, 6) and train.labels.tolist() == [0, 1, 2, 3]
    assert test.labels.tolist() == [9, 19] and test.images[:, 0, 0, 0].tolist() == [9, 19]


def test_npz_rejects_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.full((3, 4, 4), 300), labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="0..255"):
        load_dataset(str(path))
    np.savez(path, images=np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset(str(path))


def small_dataset(count: int = 10) -> ImageDataset:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1)
    return ImageDataset("tiny", images, torch.arange(count), None)


def test_iterate_batches_reproducible_and_complete() -> None:
    ds = small_dataset()

    def order(seed: int) -> list[int]:
        batches = iterate_batches(ds, 3, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return [label for _, labels in batches for label in labels.tolist()]

    assert order(1) == order(1)
    assert sorted(order(1)) == list(range(10))
    assert order(1) != order(2)
    batches = list(iterate_batches(ds, 3, shuffle=True, generator=torch.Generator().manual_seed(1)))
    assert [len(images) for images, _ in batches] == [3, 3, 3, 1]
    assert all(torch.equal(images.view(-1).long(), labels) for images, labels in batches)


def test_iterate_batches_drop_last_and_unlabeled() -> None:
    ds = ImageDataset("tiny", small_dataset().images, None, None)
    batches = list(iterate_batches(ds, 4, shuffle=False, generator=None, drop_last=True))
    assert [images.view(-1).tolist() for images, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(labels is None for _, labels in batches)


def test_real_fashion_mnist_test_split() -> None:
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
    ds = load_dataset("fashion-mnist", split="test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.class_names is not None and len(ds.class_names) == 10
    assert ds.labels is not None and sorted(ds.labels.unique().tolist()) == list(range(10))
