"""Images in and out of the pipeline: PIL / numpy / tensors to [-1, 1] tensors, masks, and back."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

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
            raise ValueError(f"{name} array has shape {image.shape}; expected [H, W, 3]")
        array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        t = image.detach().float().cpu()
        t = t[0] if t.ndim == 4 and t.shape[0] == 1 else t
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(
                f"{name} tensor has shape {tuple(image.shape)}; expected [3, H, W] or [1, 3, H, W]"
            )
    else:
        raise TypeError(f"{name} must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
    if t.min() < -1e-3 or t.max() > 1 + 1e-3:
        raise ValueError(f"{name} values span [{t.min():.3f}, {t.max():.3f}]; expected [0, 1] (or uint8)")
    return (t * 2 - 1).unsqueeze(0)


def mask_to_tensor(mask: ImageLike, height: int, width: int, name: str = "inpaint_mask") -> Tensor:
    """Return ``[1, 1, height, width]`` in [0, 1]; 1 marks pixels to generate, 0 pixels to keep."""
    if isinstance(mask, Image.Image):
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    elif isinstance(mask, np.ndarray):
        m = torch.from_numpy(mask.astype(np.float32) / (255.0 if mask.dtype == np.uint8 else 1.0))
        m = m.mean(-1) if m.ndim == 3 else m
    elif isinstance(mask, Tensor):
        m = mask.detach().float().cpu().squeeze()
        m = m.mean(0) if m.ndim == 3 else m
    else:
        raise TypeError(f"{name} must be a PIL image, a numpy array or a tensor, got {type(mask).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{name} has shape {tuple(m.shape)}; expected [H, W]")
    if m.min() < -1e-3 or m.max() > 1 + 1e-3:
        raise ValueError(f"{name} values span [{m.min():.3f}, {m.max():.3f}]; expected [0, 1] (or uint8)")
    m = m[None, None]
    if m.shape[-2:] != (height, width):
        m = torch.nn.functional.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
    return m.clamp(0, 1)


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """Resize a ``[B, 3, H, W]`` tensor to cover ``height x width`` and center-crop it."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    image = torch.nn.functional.interpolate(image, size=(new_h, new_w), mode="bilinear", antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[..., top : top + height, left : left + width]


def paste_unmasked(images: Tensor, input_image: ImageLike, inpaint_mask: ImageLike) -> Tensor:
    """Decoded ``images [B, 3, H, W]`` (in [-1, 1]) with the input's own pixels wherever the mask is 0.

    The latent hard constraint alone keeps only the input's VAE round trip outside the mask, which
    loses the detail the VAE cannot carry; pasting the pixels back makes "outside the mask the result
    is the input" exact. A soft (grey) mask blends the two.
    """
    height, width = images.shape[-2:]
    pixels = resize_image(image_to_tensor(input_image, "input_image"), height, width).to(images)
    keep = 1 - mask_to_tensor(inpaint_mask, height, width).to(images)
    return pixels * keep + images * (1 - keep)


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
