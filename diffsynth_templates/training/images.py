"""Image preparation for training: EXIF-aware inspection, RGB conversion, cover-crop, loading.

Sizes are ``(width, height)`` everywhere, like PIL.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .samples import Size

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # these rotate by 90 degrees: width and height swap


def is_transposed(image: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height, read without decoding the pixels."""
    if image.format == "PNG":
        # PNG's getexif() decodes the whole image to find a late eXIf chunk; an early one is in info
        raw = image.info.get("exif")
        if not raw:
            return False
        exif = Image.Exif()
        exif.load(raw)
    else:
        exif = image.getexif()
    return exif.get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS


@dataclass(frozen=True)
class ImageInfo:
    size: Size = (0, 0)
    error: str = ""


def inspect_image(path: Path, verify: bool) -> ImageInfo:
    """Displayed size (EXIF orientation applied) and, with ``verify``, PIL's integrity check."""
    try:
        if verify:  # verify() must come straight after open and leaves the image unusable: open twice
            with Image.open(path) as image:
                image.verify()
        with Image.open(path) as image:
            width, height = image.size
            if is_transposed(image):
                width, height = height, width
    except (
        Exception
    ) as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error... all mean "unusable"
        return ImageInfo(error=f"{type(err).__name__}: {err}")
    return ImageInfo((width, height))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode to RGB: transparency composited on ``background``, 16-bit grey scaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.float64)
        if array.max() > 255:  # 16-bit data: plain convert() would clip it to white
            array = array / 257.0
        return Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L").convert("RGB")
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))  # paste with alpha mask = "over" compositing
        return canvas
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def cover_crop(image: Image.Image, size: Size) -> Image.Image:
    """Resize to cover ``size`` and center-crop, in one LANCZOS resampling of the centered box.

    LANCZOS because training images are mostly downscaled and it aliases least; resampling the
    crop box directly (rather than resize, then crop) keeps the crop exactly centered.
    """
    target_w, target_h = size
    w, h = image.size
    if (w, h) == (target_w, target_h):
        return image.copy()
    if w * target_h > h * target_w:  # source is wider than the target: trim left and right
        crop_w = h * target_w / target_h
        box = ((w - crop_w) / 2, 0.0, (w + crop_w) / 2, float(h))
    else:
        crop_h = w * target_h / target_w
        box = (0.0, (h - crop_h) / 2, float(w), (h + crop_h) / 2)
    # reducing_gap: a cheap integer reduce() first for big downscales; the result is visually identical
    return image.resize((target_w, target_h), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def _draft_size(image: Image.Image, size: Size) -> Size:
    """The smallest stored-orientation size that still covers ``size`` after EXIF rotation."""
    w, h = image.size
    rotated = is_transposed(image)
    if rotated:
        w, h = h, w
    scale = max(size[0] / w, size[1] / h)
    need = (math.ceil(w * scale), math.ceil(h * scale))
    return (need[1], need[0]) if rotated else need


def load_image(path: str | os.PathLike, size: Size | None = None) -> Image.Image:
    """Open an image as RGB with EXIF orientation applied; with ``size``, cover-crop it to that size."""
    with Image.open(path) as image:
        if size is not None:
            # JPEG can decode at 1/2, 1/4, 1/8 scale; a large speed-up for big photos, never below `size`
            image.draft(None, _draft_size(image, size))
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
        return cover_crop(image, size) if size is not None else image.copy()


def load_and_crop(path: str | os.PathLike, size: Size) -> Image.Image:
    """RGB image of exactly ``size``: EXIF orientation, mode conversion, resize to cover, center-crop."""
    return load_image(path, size)
