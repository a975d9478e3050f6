"""The model's configuration: everything needed to rebuild it, stored as config.json beside the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = ("pixelcnn", "gated")
LEVELS = 256  # 8-bit pixels: a 256-way softmax per sub-pixel


@dataclass
class ModelConfig:
    arch: str = "gated"  # "pixelcnn" (masked convolutions) or "gated" (vertical + horizontal stacks)
    image_channels: int = 1  # 1 = grayscale, 3 = RGB sampled in R -> G -> B order within a pixel
    height: int = 28
    width: int = 28
    hidden_channels: int = 32  # width of the residual stream
    layers: int = 7  # gated layers, or residual blocks for "pixelcnn"
    first_kernel_size: int = 7  # receptive field of the first (mask A) layer
    kernel_size: int = 3  # receptive field of every later layer
    head_channels: int = 64  # width of the 1x1 output layers before the softmax
    num_classes: int = 0  # > 0 makes the model class-conditional
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels must be 1 or 3, got {self.image_channels}")
        # Every feature channel serves one colour (see masked_conv.channel_groups); the PixelCNN's
        # residual blocks also halve the width, so its hidden width needs a factor of 2 * C.
        hidden_factor = self.image_channels * (2 if self.arch == "pixelcnn" else 1)
        if self.hidden_channels % hidden_factor or self.hidden_channels < hidden_factor:
            raise ValueError(f"hidden_channels must be a positive multiple of {hidden_factor} for this arch")
        if self.head_channels % self.image_channels or self.head_channels < 1:
            raise ValueError(f"head_channels must be a positive multiple of {self.image_channels}")
        for name in ("first_kernel_size", "kernel_size"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd number, got {k}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.height, self.width)

    @property
    def dims(self) -> int:
        """Sub-pixels per image: the denominator of bits/dim."""
        return self.image_channels * self.height * self.width

    def class_name(self, index: int) -> str:
        """The name of class `index`, or the index as text where the model names no such class."""
        return self.class_names[index] if 0 <= index < len(self.class_names) else str(index)

    def class_index(self, value: int | str) -> int:
        """A class given by index or by (case-insensitive) name -> its index; ValueError naming the choices."""
        if not self.conditional:
            raise ValueError("this model is unconditional: it takes no label")
        if isinstance(value, str):
            wanted = value.strip().casefold()
            for index, name in enumerate(self.class_names):
                if name.casefold() == wanted:
                    return index
            if wanted.isascii() and wanted.isdigit():
                value = int(wanted)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < self.num_classes:
            return value
        names = ", ".join(repr(self.class_name(i)) for i in range(self.num_classes))
        given = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."  # not a client's megabytes
        raise ValueError(
            f"unknown label {given}: expected a class index 0..{self.num_classes - 1} "
            f"or a class name (case-insensitive): {names}"
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**data)
