"""PixelCNN models: `load(path)` a checkpoint, call `model(x, labels)` for logits (B, 256, C, H, W)."""

from .checkpoint import PixelCNNModel, build, load, pick_device, save
from .config import ARCHS, LEVELS, ModelConfig
from .likelihood import bits_per_dim, marginal_nll_nats, nll_nats, nll_per_subpixel
from .sampling import Samples, sample_naive

__all__ = [
    "ARCHS",
    "LEVELS",
    "ModelConfig",
    "PixelCNNModel",
    "Samples",
    "bits_per_dim",
    "build",
    "load",
    "marginal_nll_nats",
    "nll_nats",
    "nll_per_subpixel",
    "pick_device",
    "sample_naive",
    "save",
]
