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


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose header declares width x height 8-bit grayscale, with `idat` as its (zlib) pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_the_size_is_checked_from_the_header_before_any_pixel_is_decoded(monkeypatch):
    """A few hundred KB of PNG can declare an image of gigabytes: it is refused by its header's size (an
    empty IDAT would fail the decode as "truncated" had the decode come first)."""
    from PIL import ImageFile

    from app.imaging import decode_alpha

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    for decode in (lambda data: decode_image(data, 1, 28, 28), lambda data: decode_alpha(data, 28, 28)):
        try:
            decode(png_declaring(13000, 13000))
        except ImageDecodeError as error:
            assert str(error) == "image is 13000x13000 (WxH), the model expects 28x28"
        else:
            raise AssertionError("a 13000x13000 image was accepted")


def test_only_common_raster_formats_are_opened():
    """EPS would hand a client's PostScript to Ghostscript; TGA, ICO, PCX and the like are not what anyone
    uploads by mistake. The message says what is taken."""
    import pytest

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"
    gray = Image.fromarray(np.full((28, 28), 200, dtype=np.uint8), mode="L")
    for data in (
        eps,
        encoded(gray, "TGA"),
        encoded(gray, "PCX"),
        encoded(gray.convert("RGB"), "ICO", sizes=[(28, 28)]),
    ):
        with pytest.raises(ImageDecodeError) as refused:
            decode_image(data, 1, 28, 28)
        assert str(refused.value) == (
            "could not read the image (unknown or damaged image format); expected a PNG, JPEG, BMP, WebP, GIF or "
            "TIFF file"
        )
    for fmt in ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"):
        taken = decode_image(encoded(gray, fmt, **({"lossless": True} if fmt == "WEBP" else {})), 1, 28, 28)
        assert taken.shape == (1, 28, 28) and (taken == 200).all(), fmt


def test_a_transparent_colour_is_alpha_and_a_bad_mask_says_why():
    """PNGs without an alpha channel can declare one colour transparent (tRNS), as image editors save masks."""
    import pytest

    from app.imaging import decode_alpha

    values = np.where(np.arange(28 * 28).reshape(28, 28) < 400, 255, 0).astype(np.uint8)
    for picture, transparent in (
        (Image.fromarray(values, mode="L"), 0),
        (Image.fromarray(np.stack([values] * 3, -1), mode="RGB"), (0, 0, 0)),
        (Image.fromarray(values.astype(np.uint16) * 300), 0),  # 16-bit grayscale: PIL's convert drops tRNS
        (Image.fromarray(values, mode="L").convert("1"), 0),  # 1-bit
    ):
        alpha = decode_alpha(encoded(picture, "PNG", transparency=transparent), 28, 28)
        assert alpha is not None, picture.mode
        assert np.array_equal(alpha, np.where(values == 0, 0, 255)), picture.mode
    assert decode_alpha(encoded(Image.fromarray(values, mode="L"), "PNG"), 28, 28) is None, "no transparency: no alpha"
    with pytest.raises(ImageDecodeError) as garbage:
        decode_alpha(b"garbage", 28, 28)
    assert str(garbage.value) == (
        "could not read the image (unknown or damaged image format); expected a PNG or WebP file with alpha"
    )
