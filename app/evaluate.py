"""Test-set likelihood: NLL in nats per image and bits/dim, one teacher-forced forward pass per batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from app.data import ImageDataset, iterate_batches
from app.model import ModelConfig, bits_per_dim, nll_nats


@dataclass
class Evaluation:
    nll_nats: float  # mean over images
    bits_per_dim: float
    images: int
    conditional_on_labels: bool  # class-conditional models are scored as p(x | true label)

    def as_dict(self) -> dict:
        return {
            "nll_nats": self.nll_nats,
            "bits_per_dim": self.bits_per_dim,
            "images": self.images,
            "conditional_on_labels": self.conditional_on_labels,
        }


def check_dataset(config: ModelConfig, dataset: ImageDataset) -> None:
    """The dataset fits the model: same image shape, and labels for a class-conditional model."""
    if tuple(dataset.images.shape[1:]) != config.shape:
        raise ValueError(
            f"{dataset.name} images are {tuple(dataset.images.shape[1:])}, the model expects {config.shape}"
        )
    if config.conditional and dataset.labels is None:
        raise ValueError(f"a class-conditional model needs labels, and {dataset.name} has none")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageDataset, batch_size: int = 256) -> Evaluation:
    config = model.config
    check_dataset(config, dataset)
    use_labels = config.conditional
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for images, labels in iterate_batches(dataset, batch_size, shuffle=False, generator=None):
        labels = labels.to(device) if use_labels else None
        total += nll_nats(model, images.to(device), labels).double().sum().item()
        count += images.shape[0]
    model.train(was_training)
    mean = total / max(count, 1)
    return Evaluation(mean, bits_per_dim(mean, config.dims), count, use_labels)
