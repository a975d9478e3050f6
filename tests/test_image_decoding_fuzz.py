"""Image decoding under hostile input (hypothesis): every upload either decodes to the model's shape or
raises ImageDecodeError, whose message the API returns as a 400; nothing else ever escapes."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.imaging import ImageDecodeError, decode_image

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"]


def decodes_or_explains(data: bytes, channels: int = 1) -> None:
    try:
        image = decode_image(data, channels, 28, 28)
    except ImageDecodeError as error:
        assert str(error)  # a message for the client
        return
    assert image.shape == (channels, 28, 28) and image.dtype == np.uint8


def encoded(picture: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes(data):
    decodes_or_explains(data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(MODES),
    size=st.sampled_from([(28, 28), (27, 28), (1, 1), (64, 64)]),
    fmt=st.sampled_from(["PNG", "TIFF", "BMP", "WEBP", "GIF", "JPEG"]),
    channels=st.sampled_from([1, 3]),
    cut=st.integers(min_value=0, max_value=400),
    seed=st.integers(0, 2**16),
)
def test_every_mode_and_format_whole_or_truncated(mode, size, fmt, channels, cut, seed):
    rng = np.random.default_rng(seed)
    picture = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    try:
        picture = picture.convert(mode)
        data = encoded(picture, fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot store this mode: nothing to upload
    decodes_or_explains(data, channels)
    decodes_or_explains(data[: len(data) - cut] if cut < len(data) else data[:1], channels)


def test_palette_with_transparency_16_bit_and_animated_images():
    palette = Image.fromarray(np.arange(784, dtype=np.uint8).reshape(28, 28) % 16, "L").convert("P")
    palette.info["transparency"] = 3
    decodes_or_explains(encoded(palette, "PNG"))
    wide = Image.fromarray(np.arange(784, dtype=np.uint16).reshape(28, 28) * 80)  # mode I;16
    assert decode_image(encoded(wide, "PNG"), 1, 28, 28).max() > 0
    frames = [Image.new("L", (28, 28), v) for v in (0, 128, 255)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decodes_or_explains(buffer.getvalue())  # the first frame, or a clear refusal


def test_a_huge_declared_size_is_refused_without_decoding_it():
    """A PNG header declaring 100000 x 100000 pixels (a decompression bomb) is refused by its size."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    try:
        decode_image(data, 1, 28, 28)
    except ImageDecodeError as error:
        assert "28x28" in str(error) or "could not read" in str(error)
    else:
        raise AssertionError("a 100000x100000 image was accepted")
