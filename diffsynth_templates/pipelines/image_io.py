"""Images in and out of the pipeline: PIL / numpy / tensors to [-1, 1] tensors, masks, and back."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..loading.finite import check_finite_tensor
from .common import PipelineInputError

ImageLike = Image.Image | np.ndarray | Tensor


def image_to_tensor(image: ImageLike, name: str = "image") -> Tensor:
    """Return ``[1, 3, H, W]`` float32 in [-1, 1].

    PIL images of any mode are converted to RGB; numpy arrays are ``[H, W, 3]`` (uint8 or floats in
    [0, 1]); tensors are ``[3, H, W]`` or ``[1, 3, H, W]`` floats in [0, 1], as diffusers takes them.
    """
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(array).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise PipelineInputError(f"{name} array has shape {image.shape}; expected [H, W, 3]")
        _check_numeric(image, name)
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        t = image.detach().float().cpu()
        t = t[0] if t.ndim == 4 and t.shape[0] == 1 else t
        if t.ndim != 3 or t.shape[0] != 3:
            raise PipelineInputError(
                f"{name} tensor has shape {tuple(image.shape)}; expected [3, H, W] or [1, 3, H, W]"
            )
    else:
        raise PipelineInputError(
            f"{name} must be a PIL image, a numpy array or a tensor, got {type(image).__name__}"
        )
    check_finite_tensor(name, t)
    if t.min() < -1e-3 or t.max() > 1 + 1e-3:
        raise PipelineInputError(
            f"{name} values span [{t.min():.3f}, {t.max():.3f}]; expected [0, 1] (or uint8)"
        )
    return (t * 2 - 1).unsqueeze(0)


def _check_numeric(array: np.ndarray, name: str) -> None:
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise PipelineInputError(
            f"{name} array has dtype {array.dtype}; expected numbers (uint8 or floats in [0, 1])"
        )


class MaskSizeError(PipelineInputError):
    """An inpaint mask whose size differs from its image's."""


def mask_to_tensor(mask: ImageLike, name: str = "inpaint_mask") -> Tensor:
    """Return ``[1, 1, H, W]`` in [0, 1] at the mask's own size; 1 marks pixels to generate, 0 to keep.

    Masks are never resized here: ``inpaint_pair`` ties a mask to its image and ``place_mask`` puts it
    onto the output grid exactly where ``resize_image`` puts the image.
    """
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(mask, np.ndarray):
        _check_numeric(mask, name)
        m = torch.from_numpy(mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0))
        m = m.mean(-1) if m.ndim == 3 else m
    elif isinstance(mask, Tensor):
        m = mask.detach().float().cpu().squeeze()
        m = m.mean(0) if m.ndim == 3 else m
    else:
        raise PipelineInputError(
            f"{name} must be a PIL image, a numpy array or a tensor, got {type(mask).__name__}"
        )
    if m.ndim != 2:
        raise PipelineInputError(f"{name} has shape {tuple(m.shape)}; expected [H, W]")
    check_finite_tensor(name, m)
    if m.min() < -1e-3 or m.max() > 1 + 1e-3:
        raise PipelineInputError(
            f"{name} values span [{m.min():.3f}, {m.max():.3f}]; expected [0, 1] (or uint8)"
        )
    return m[None, None].clamp(0, 1)


def inpaint_pair(
    image: ImageLike,
    mask: ImageLike,
    resize_mask: bool = False,
    image_name: str = "input_image",
    mask_name: str = "inpaint_mask",
) -> tuple[Tensor, Tensor]:
    """An image and its mask as ``[1, 3, H, W]`` in [-1, 1] and ``[1, 1, H, W]`` in [0, 1], same size.

    A mask of another size than its image is an error naming both sizes: stretching it silently would
    move the region the user marked. ``resize_mask=True`` asks for that stretch (bilinear) explicitly.
    """
    if not isinstance(resize_mask, bool):
        raise PipelineInputError(f"resize_mask must be True or False, got {resize_mask!r}")
    pixels = image_to_tensor(image, image_name)
    m = mask_to_tensor(mask, mask_name)
    size, mask_size = tuple(pixels.shape[-2:]), tuple(m.shape[-2:])
    if mask_size != size:
        if not resize_mask:
            raise MaskSizeError(
                f"{mask_name} is {_wxh(mask_size)} pixels but {image_name} is {_wxh(size)}; pass a mask "
                "of the image's size (white = regenerate, black = keep), or resize_mask=True to stretch "
                "the mask to the image first"
            )
        m = _bilinear(m, size).clamp(0, 1)
    return pixels, m


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]} (width x height)"


def cover_geometry(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Resize ``h x w`` to cover ``height x width``, then center-crop: ``(new_h, new_w, top, left)``.

    The one placement rule of the pipeline: images (``resize_image``) and their masks (``place_mask``)
    both follow it, so a mask stays on the pixels it marks whatever the aspect ratios.
    """
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    return new_h, new_w, (new_h - height) // 2, (new_w - width) // 2


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """Resize a ``[B, 3, H, W]`` tensor to cover ``height x width`` and center-crop it."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    new_h, new_w, top, left = cover_geometry(h, w, height, width)
    image = torch.nn.functional.interpolate(image, size=(new_h, new_w), mode="bilinear", antialias=True)
    return image[..., top : top + height, left : left + width]


def place_mask(mask: Tensor, height: int, width: int, grid: tuple[int, int] | None = None) -> Tensor:
    """A ``[1, 1, H, W]`` mask (at its image's size) placed like ``resize_image`` places the image.

    ``grid`` (default ``height x width``) is the resolution wanted in the end, e.g. the latent grid;
    the region is cropped on the ``height x width`` pixel grid first, so it is the image's region.
    """
    grid = (height, width) if grid is None else tuple(grid)
    new_h, new_w, top, left = cover_geometry(*mask.shape[-2:], height, width)
    if (new_h, new_w) == (height, width):  # nothing cropped: one resampling, straight to the grid
        return _bilinear(mask, grid).clamp(0, 1)
    placed = _bilinear(mask, (new_h, new_w))[..., top : top + height, left : left + width]
    return _bilinear(placed, grid).clamp(0, 1)


def place_image_and_mask(
    pixels: Tensor, mask: Tensor, height: int, width: int, grid: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """An ``inpaint_pair`` placed onto the ``height x width`` output: both resized and cropped alike."""
    return resize_image(pixels, height, width), place_mask(mask, height, width, grid)


def _bilinear(t: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)


def paste_unmasked(
    images: Tensor, input_image: ImageLike, inpaint_mask: ImageLike, resize_mask: bool = False
) -> Tensor:
    """Decoded ``images [B, 3, H, W]`` (in [-1, 1]) with the input's own pixels wherever the mask is 0.

    The latent hard constraint alone keeps only the input's VAE round trip outside the mask, which
    loses the detail the VAE cannot carry; pasting the pixels back makes "outside the mask the result
    is the input" exact. A soft (grey) mask blends the two. The mask must have the input's size
    (``resize_mask=True``: stretched to it first); both are placed onto the output alike.
    """
    height, width = images.shape[-2:]
    pixels, mask = place_image_and_mask(*inpaint_pair(input_image, inpaint_mask, resize_mask), height, width)
    keep = 1 - mask.to(images)
    return pixels.to(images) * keep + images * (1 - keep)


def fit_to_area(height: int, width: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """Shrink (never grow) to at most ``max_area`` pixels, keeping aspect; round down to ``multiple``."""
    if height * width > max_area:
        scale = math.sqrt(max_area / (height * width))
        height, width = int(height * scale), int(width * scale)
    return max(multiple, height // multiple * multiple), max(multiple, width // multiple * multiple)


def tensor_to_output(images: Tensor, output_type: str) -> list[Image.Image] | np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] to PIL images or floats in [0, 1] shaped ``[B, H, W, 3]``."""
    array = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
