"""Checkpoint folders: config.json beside model.safetensors. Weights are never unpickled."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig
from .gated import GatedPixelCNN
from .pixelcnn import PixelCNN

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")  # refused: unpickling runs code

PixelCNNModel = PixelCNN | GatedPixelCNN  # a model of either architecture (ModelConfig.arch)


def build(config: ModelConfig) -> PixelCNNModel:
    return GatedPixelCNN(config) if config.arch == "gated" else PixelCNN(config)


def save(model: nn.Module, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / CONFIG_FILE)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE))
    # safetensors creates the file 0600; a server running as another user (containers) must read it.
    (path / WEIGHTS_FILE).chmod(0o644)


def full_float32_on_cuda() -> None:
    """No TF32 on CUDA: its 10-bit mantissa would make the naive convolutions and the cached matrix
    products disagree (and depend on the kernel chosen for a batch size). Process-wide, set before any
    model runs on a GPU; costs matmul speed on Ampere and later, which the sampler does not need."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def pick_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is an error that says so."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available (torch.cuda.is_available() is False)")
    device = torch.device(name)
    if device.type == "cuda":
        full_float32_on_cuda()
    return device


def load(path: str | Path, device: str | torch.device = "cpu") -> PixelCNNModel:
    """Rebuild the model from a checkpoint folder, in eval mode on `device`."""
    path = Path(path)
    if not (path / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in path.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise FileNotFoundError(
                f"{path}: weights are loaded only from {WEIGHTS_FILE}, never from pickle files (found "
                f"{', '.join(pickles)}, not opened); convert them with safetensors.torch.save_file"
            )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a model checkpoint: {name} is missing")
    model = build(ModelConfig.load(path / CONFIG_FILE))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    if torch.device(device).type == "cuda":
        full_float32_on_cuda()
    model.to(device).eval()  # in place: Module.to and .eval return the module itself
    return model
