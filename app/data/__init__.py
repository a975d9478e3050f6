"""Dataset layer: load image datasets (Fashion-MNIST, MNIST, CIFAR-10, image folders, .npz) as uint8 tensors."""

from app.data.dataset import DatasetNotFoundError, ImageDataset, iterate_batches
from app.data.loading import load_dataset

__all__ = ["DatasetNotFoundError", "ImageDataset", "iterate_batches", "load_dataset"]
