"""``image_lora``: an image -> a LoRA for a list of DiT Linear modules (image-to-LoRA).

``process_inputs`` encodes the image with the base VAE (at its own size, rounded to whole tokens and
shrunk to at most ``max_area`` pixels). ``forward`` embeds the latent tokens, runs a small
transformer encoder over them and averages them into one image code ``g``. Per target module, ``B``
is generated from ``g`` (a Linear to ``out * rank`` numbers) and ``A`` is a learned per-module basis:
the image chooses the output directions of a fixed set of input directions. The B generator starts
at zero, so an untrained template is an exact no-op LoRA.

Emits ``{"lora": {"{module}.lora_A.weight": [rank, in], "{module}.lora_B.weight": [out, rank]}}``
with ``{module}`` the DiT's own Linear paths (DESIGN.md 4.2). Parameters at klein-4B size (rank 4,
image-stream q/k/v/out of the 5 double blocks and attn.to_out of the 20 single blocks): 129.2 M,
almost all in the B generators; klein-9B: 239.5 M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...loading.meta_init import scaled_normal_
from ...pipelines.image_io import fit_to_area, image_to_tensor
from ..base import TemplateModel
from ..registry import register_architecture
from ..schema import InputField, InputSchema, TemplateInputError
from ._common import (
    DiTConfig,
    LoRATargetsConfig,
    TemplateConfigError,
    base_layout,
    check_positive,
    module_key,
    parameter_device,
    parameter_dtype,
)


@dataclass
class ImageLoRAConfig(LoRATargetsConfig):
    latent_channels: int = 128
    hidden: int = 256  # width of the image encoder and of the image code
    num_layers: int = 2
    num_heads: int = 4
    max_area: int = 512 * 512  # images are encoded at most this many pixels (bounds the token count)

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_positive(
            owner,
            latent_channels=self.latent_channels,
            hidden=self.hidden,
            num_heads=self.num_heads,
            max_area=self.max_area,
        )
        if isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise TemplateConfigError(f"{owner}.num_layers must be an integer >= 0, got {self.num_layers!r}")
        if self.hidden % self.num_heads:
            raise TemplateConfigError(
                f"{owner}.hidden {self.hidden} is not divisible by num_heads {self.num_heads}"
            )

    @classmethod
    def for_dit(cls, dit_config: DiTConfig, modules=None, **kwargs: Any) -> ImageLoRAConfig:
        """Targets of ``dit_config``; the image is read as that base's VAE latents."""
        kwargs.setdefault("latent_channels", base_layout(dit_config).latent_channels)
        return super().for_dit(dit_config, modules, **kwargs)

    @classmethod
    def tiny(cls, modules=None, **kwargs: Any) -> ImageLoRAConfig:
        """Matches ``random_flux2_pipeline()``'s DiT; a 32-wide one-layer encoder."""
        return super().tiny(modules, **{"hidden": 32, "num_layers": 1, "num_heads": 2, **kwargs})

    @classmethod
    def tiny_zimage(cls, modules=None, **kwargs: Any) -> ImageLoRAConfig:
        """Matches ``random_zimage_pipeline()``'s DiT; a 32-wide one-layer encoder."""
        return super().tiny_zimage(modules, **{"hidden": 32, "num_layers": 1, "num_heads": 2, **kwargs})


class LoRAHead(nn.Module):
    """One target module: a learned A basis ``[rank, in]`` and a generator of B ``[out, rank]`` from ``g``."""

    def __init__(self, hidden: int, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.shape_b = (out_features, rank)
        # randn(rank, in) / sqrt(in) as an initializer a meta-device build skips (loading.meta_init)
        self.lora_A = nn.Parameter(scaled_normal_(torch.empty(rank, in_features), div=math.sqrt(in_features)))
        self.to_B = nn.Linear(hidden, out_features * rank)
        nn.init.zeros_(self.to_B.weight)  # B = 0: an untrained template changes nothing
        nn.init.zeros_(self.to_B.bias)

    def forward(self, code: Tensor) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.to_B(code).reshape(self.shape_b)


@register_architecture("image_lora")
class ImageLoRA(TemplateModel):
    """Image -> ``{"lora": ...}``. Inputs: ``image``; optional ``height`` / ``width`` (pixels) to encode at."""

    config_class = ImageLoRAConfig
    input_schema = InputSchema(
        [
            InputField("image", "image", description="the image the LoRA is made from"),
            InputField("height", "int", required=False, minimum=1, description="encode at this height"),
            InputField("width", "int", required=False, minimum=1, description="encode at this width"),
        ]
    )
    cache_keys = ("lora",)

    def __init__(self, config: ImageLoRAConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.latent_channels, config.hidden)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.hidden,
                config.num_heads,
                4 * config.hidden,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.hidden)
        self.heads = nn.ModuleDict(
            {
                module_key(m): LoRAHead(config.hidden, i, o, config.rank)
                for m, i, o in zip(config.modules, config.in_features, config.out_features)
            }
        )

    @torch.no_grad()
    def process_inputs(
        self,
        pipe: Any = None,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        **inputs,
    ) -> dict[str, Tensor]:
        """``{"latents": [1, C, h, w]}``: the image as the base VAE's DiT latents (FLUX.2: 128 channels
        per token; Z-Image: 16 channels per latent pixel)."""
        if pipe is None:
            raise TemplateInputError("image_lora encodes its image with the base model's VAE: pass pipe=...")
        if image is None:
            raise TemplateInputError("image_lora: missing input 'image' (the image the LoRA is made from)")
        step = pipe.pixels_per_token
        h, w = image_to_tensor(image, "image_lora: input 'image'").shape[-2:]
        h, w = fit_to_area(height or h, width or w, self.config.max_area, step)
        latents = pipe.encode_image(image, h, w, "image_lora: input 'image'")
        return {"latents": latents.float().to(parameter_device(self))}

    def forward(self, pipe: Any = None, latents: Tensor | None = None, **features: Any) -> dict[str, Any]:
        cfg = self.config
        if latents is None or latents.ndim != 4 or latents.shape[:2] != (1, cfg.latent_channels):
            got = None if latents is None else tuple(latents.shape)
            raise TemplateInputError(
                f"image_lora.forward needs 'latents' [1, {cfg.latent_channels}, h, w] from process_inputs, got {got}"
            )
        tokens = latents.to(parameter_device(self), parameter_dtype(self)).flatten(2).transpose(1, 2)
        x = self.embed(tokens)
        for layer in self.encoder:
            x = layer(x)
        code = self.norm(x).mean(dim=1)  # [1, hidden]: the whole image in one vector
        lora = {}
        for module in cfg.modules:
            a, b = self.heads[module_key(module)](code)
            lora[f"{module}.lora_A.weight"] = a
            lora[f"{module}.lora_B.weight"] = b
        return {"lora": lora}
