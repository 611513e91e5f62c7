"""The one reader of an image file a user names (a flag, a job file, validation inputs)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ..errors import DiffSynthTemplatesError


class ImageFileError(DiffSynthTemplatesError, ValueError):
    """An image file named by the user is missing or cannot be decoded."""


def open_image(
    path: str | os.PathLike,
    what: str = "image",
    *,
    mode: str | None = "RGB",
    error: type[Exception] = ImageFileError,
) -> Image.Image:
    """The image at ``path``, fully decoded (the file is closed), converted to ``mode`` unless None.

    A missing file or one PIL cannot decode (not an image, truncated, a decompression bomb) raises
    ``error`` (a CLI passes its own error class) with a message naming ``what`` and the path.
    """
    if not Path(path).is_file():
        raise error(f"{what} {str(path)!r} does not exist (or is not a file); check the path")
    try:
        image = Image.open(path)
        image.load()  # decode now: a broken file fails here, not deep inside a pipeline call
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise error(f"{what} {str(path)!r} cannot be read; it is not a readable image ({e})") from e
    if mode is None:
        return image
    with image:
        return image.convert(mode)
