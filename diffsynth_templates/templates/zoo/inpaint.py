"""``inpaint``: ``image_kv`` over an image and its mask, with an optional hard constraint.

The mask is an extra input channel (the fraction of masked pixels under each token) and the masked
pixels are hidden (mid-grey) before VAE encoding, so the template learns to fill, not to copy. With
``force_inpaint=True`` the cache also carries ``inpaint_mask`` and ``input_image``: the pipeline then
keeps every pixel outside the mask exactly as in the input (see ``Flux2ImagePipeline.__call__``);
without it the unmasked region is only guided by the KV tokens. The mask must have the image's size
(``resize_mask=True`` stretches it to the image first); image and mask are then resized and cropped
alike (``pipelines.image_io.place_image_and_mask``), so the mask stays on the pixels it marks.

Typical KV length: 4096 tokens at 1024 x 1024. Parameters at klein-4B size: 756.2 M, as ``image_kv``
plus one x_embedder column for the mask; klein-9B: 1.58 B.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...pipelines.image_io import inpaint_pair
from ..registry import register_architecture
from ..schema import InputField, TemplateInputError
from ._common import TemplateConfigError
from .image_kv import ImageKV, ImageKVConfig, image_kv_schema

FORCE_INPAINT = InputField(
    "force_inpaint",
    "bool",
    required=False,
    default=False,
    description="also keep the unmasked pixels exactly (emits inpaint_mask + input_image)",
)


@dataclass
class InpaintConfig(ImageKVConfig):
    mask_channel: bool = True

    def __post_init__(self) -> None:
        if not self.mask_channel:
            raise TemplateConfigError(
                "InpaintConfig.mask_channel must be True: inpainting reads the mask (use image_kv without one)"
            )
        super().__post_init__()


@register_architecture("inpaint")
class Inpaint(ImageKV):
    """Image + mask -> ``{"kv_cache": ...}``, and with ``force_inpaint`` also ``inpaint_mask`` and
    ``input_image`` (``[1, 1, H, W]`` and ``[1, 3, H, W]`` in [0, 1], at the input image's size)."""

    config_class = InpaintConfig
    input_schema = image_kv_schema(InpaintConfig(), [FORCE_INPAINT])
    cache_keys = ("kv_cache", "inpaint_mask", "input_image")

    def __init__(self, config: InpaintConfig):
        super().__init__(config)
        self.input_schema = image_kv_schema(config, [FORCE_INPAINT])

    @torch.no_grad()
    def process_inputs(
        self,
        pipe: Any = None,
        image: Any = None,
        mask: Any = None,
        force_inpaint: bool = False,
        resize_mask: bool = False,
        **inputs: Any,
    ) -> dict[str, Tensor]:
        for name, flag in (("force_inpaint", force_inpaint), ("resize_mask", resize_mask)):
            if not isinstance(flag, bool):
                raise TemplateInputError(f"{self._who}: {name} must be true or false, got {flag!r}")
        features = super().process_inputs(pipe, image=image, mask=mask, resize_mask=resize_mask, **inputs)
        if force_inpaint:  # the constraint works in pixels: hand over the inputs themselves, at the
            # image's own size; the pipeline places both onto its output alike
            pixels, pixel_mask = inpaint_pair(
                image, mask, resize_mask, f"{self._who}: input 'image'", f"{self._who}: input 'mask'"
            )
            features["input_image"] = (pixels + 1) / 2
            features["inpaint_mask"] = pixel_mask
        return features

    def forward(
        self,
        pipe: Any = None,
        inpaint_mask: Tensor | None = None,
        input_image: Tensor | None = None,
        **features: Any,
    ) -> dict[str, Any]:
        cache = super().forward(pipe, **features)
        if (inpaint_mask is None) != (input_image is None):
            raise TemplateInputError(
                f"{self._who}.forward got only one of inpaint_mask / input_image; the constraint needs both"
            )
        if inpaint_mask is not None:
            cache["inpaint_mask"] = inpaint_mask
            cache["input_image"] = input_image
        return cache
