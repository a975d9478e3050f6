"""PNG in and out: uint8 arrays (C, H, W) <-> PNG bytes, and grids of several images.

Plain numpy: torch tensors (on the CPU) are accepted wherever an array is, and nothing here needs torch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image


class ImageDecodeError(ValueError):
    """An uploaded image that cannot be used; the message says what was wrong and what was expected."""


def to_pil(image) -> Image.Image:
    """uint8 (C, H, W), C in {1, 3} -> a PIL image in mode L or RGB."""
    array = np.asarray(image, dtype=np.uint8)
    if array.shape[0] == 1:
        return Image.fromarray(array[0], mode="L")
    return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def grid(images, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one uint8 (C, H', W') image, `columns` per row, separated by black lines."""
    images = np.asarray(images, dtype=np.uint8)
    n, c, h, w = images.shape
    columns = max(1, min(columns or n, n))
    rows = -(-n // columns)
    out = np.zeros((c, rows * (h + padding) + padding, columns * (w + padding) + padding), dtype=np.uint8)
    for k in range(n):
        top = padding + (k // columns) * (h + padding)
        left = padding + (k % columns) * (w + padding)
        out[:, top : top + h, left : left + w] = images[k]
    return out


def enlarge(image, scale: int) -> np.ndarray:
    """uint8 (C, H, W) -> (C, H*scale, W*scale): every pixel becomes a scale x scale block (nearest
    neighbour, so the picture stays exact and a person can see the pixels)."""
    array = np.asarray(image, dtype=np.uint8)
    return array if scale == 1 else array.repeat(scale, axis=1).repeat(scale, axis=2)


def picture(images, columns: int = 8) -> np.ndarray:
    """What one PNG of generated images shows: the image itself when there is one (the same bytes the API
    returns for it), else a grid of up to `columns` per row."""
    images = np.asarray(images, dtype=np.uint8)
    return images[0] if len(images) == 1 else grid(images, columns=min(len(images), columns))


def save_grid(images, path: Path | str, columns: int | None = None, scale: int = 1) -> None:
    to_pil(enlarge(grid(images, columns), scale)).save(path)


# The formats an upload may be in: the common raster formats, which PIL decodes itself. Not every format
# PIL can open: EPS would have Ghostscript run a client's PostScript, and most others are not pictures.
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
UPLOAD_FORMAT_NAMES = "PNG, JPEG, BMP, WebP, GIF or TIFF"


def open_upload(data: bytes, height: int, width: int, expected: str) -> Image.Image:
    """Image file bytes -> a decoded PIL image of exactly width x height, else ImageDecodeError saying why
    and `expected` (what would do). The size is checked from the file's header, before a pixel is decoded:
    a small file can declare a huge image (a few hundred KB of PNG inflate to gigabytes)."""
    try:
        with warnings.catch_warnings():  # PIL's warning of a huge declared size: refused just below anyway
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
        if picture.size == (width, height):
            picture.load()
    except Exception as error:  # PIL raises many types for bad bytes
        reason = "unknown or damaged image format" if "cannot identify" in str(error) else str(error)
        raise ImageDecodeError(f"could not read the image ({reason}); expected {expected}") from None
    if picture.size != (width, height):
        raise ImageDecodeError(f"image is {picture.width}x{picture.height} (WxH), the model expects {width}x{height}")
    return picture


def decode_image(data: bytes, channels: int, height: int, width: int) -> np.ndarray:
    """Image file bytes -> uint8 (C, H, W) for a model with `channels` colours of size height x width.

    Conversions (documented for users): a grayscale model takes L directly and converts RGB, RGBA,
    palette and 16-bit images with PIL's ITU-R 601-2 luma (L = R*299/1000 + G*587/1000 + B*114/1000),
    dropping alpha; 16-bit grayscale is scaled to 8 bits (value >> 8). An RGB model takes RGB, converts
    L/palette by repetition and drops alpha. The size must match exactly: nothing is resized, because a
    silently rescaled image gives a meaningless likelihood.
    """
    picture = open_upload(data, height, width, f"a {UPLOAD_FORMAT_NAMES} file")
    try:
        if picture.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(picture, dtype=np.int64)
            shift = 8 if array.max(initial=0) > 255 or picture.mode.startswith("I;16") else 0
            picture = Image.fromarray((array >> shift).clip(0, 255).astype(np.uint8), mode="L")
        if channels == 1:
            array = np.array(picture.convert("L"))[None]
        else:
            array = np.array(picture.convert("RGB")).transpose(2, 0, 1)
    except (ValueError, OSError) as error:  # modes PIL cannot convert (LAB, HSV, ...) or bad pixel data
        raise ImageDecodeError(
            f"could not use a {picture.mode} image ({error}); expected grayscale, RGB, RGBA, palette or 16-bit"
        ) from None
    return np.ascontiguousarray(array)


IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image, fmt: str, quality: int | None = None) -> bytes:
    """uint8 (C, H, W) -> an image file in `fmt` (png, jpeg or webp). PNG is exact; JPEG and WebP compress
    with `quality` 0..100 (WebP without it is lossless, so exact too; JPEG without it uses quality 95)."""
    if fmt == "png":
        return png_bytes(image)
    buffer = io.BytesIO()
    if fmt == "webp" and quality is None:
        to_pil(image).save(buffer, format="WEBP", lossless=True)
    else:
        to_pil(image).save(buffer, format=IMAGE_FORMATS[fmt], quality=95 if quality is None else quality)
    return buffer.getvalue()


def decode_alpha(data: bytes, height: int, width: int) -> np.ndarray | None:
    """The alpha channel of an image file, uint8 (H, W), or None if it has none (a transparent colour, as
    palette, grayscale and RGB PNGs can declare, counts as alpha). ImageDecodeError for unreadable files
    or the wrong size, as decode_image."""
    picture = open_upload(data, height, width, "a PNG or WebP file with alpha")
    transparent = picture.info.get("transparency")
    if transparent is not None and picture.mode in ("1", "I", "I;16"):  # PIL's convert drops it for these
        return np.where(np.asarray(picture, dtype=np.int64) == transparent, 0, 255).astype(np.uint8)
    if transparent is not None and picture.mode in ("P", "L", "RGB"):
        picture = picture.convert("RGBA")
    if picture.mode not in ("RGBA", "LA", "PA", "La", "RGBa"):
        return None
    return np.array(picture.getchannel("A"))
