"""The Z-Image side of the objective: latents as ``[C, 1, h, w]`` lists, caption features, the DiT call.

Per sample: sigma from DiffSynth-Studio's Z-Image training grid (``noise.draw_shifted_noise``: a
uniform index into 1000 sigmas statically shifted by 3), ``x_t = (1 - sigma) x0 + sigma noise`` on
the VAE latents ``[1, 16, h, w]``, the caption features ``[L, D]`` with the template's
``extra_text_embedding`` appended. The DiT reads ``t = 1 - sigma`` and returns the *negated*
velocity, so the prediction scored against ``noise - x0`` is ``-output`` (as ``ZImagePipeline``
samples). Z-Image's DiT takes no reference images: samples with edit latents are refused.

Samples batch when their latents and KV token counts agree; captions may differ in length (the DiT
pads each to a multiple of 32 tokens and masks the padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import DiffSynthTemplatesError
from ..pipelines.flow_match import NUM_TRAIN_TIMESTEPS, add_noise
from .noise import ZIMAGE_TRAINING_SHIFT, draw_shifted_noise

if TYPE_CHECKING:
    from .features import SampleFeatures


class UnsupportedFeatureError(DiffSynthTemplatesError, ValueError):
    """The base model cannot use this part of a sample (e.g. edit images on Z-Image)."""


EDIT_IMAGES_UNSUPPORTED = (
    "Z-Image's DiT takes no reference (edit) images, only FLUX.2-klein's does; drop edit_image from "
    "these rows, or hand the source image to the template through template_inputs "
    '(e.g. {"image": "source.png"}), which any backbone supports'
)


@dataclass
class ZImageSample:
    x0: Tensor  # [1, C, h, w]
    noise: Tensor
    sigma: Tensor
    caption: Tensor  # [L, D]
    kv: dict[str, tuple[Tensor, Tensor]]
    lora: dict[str, Tensor] | None

    def signature(self) -> tuple:
        """Samples with equal signatures go through the DiT as one batch (captions may be ragged)."""
        return (
            tuple(self.x0.shape),
            tuple(sorted((n, tuple(k.shape[1:])) for n, (k, _) in self.kv.items())),
        )


@dataclass
class ZImageObjective:
    shift: float = ZIMAGE_TRAINING_SHIFT

    def prepare(
        self, features: SampleFeatures, seed: int, cache: dict[str, Any], device: torch.device
    ) -> ZImageSample:
        if features.edit_latents:
            raise UnsupportedFeatureError(
                f"metadata line {features.line} (sample {features.id}) has edit images: {EDIT_IMAGES_UNSUPPORTED}"
            )
        latents = features.latents.to(device, torch.float32)[None]  # [1, C, h, w]
        sigma, noise = draw_shifted_noise(seed, tuple(latents.shape), self.shift)
        caption = features.prompt_embeds.to(device)
        extra = cache.get("extra_text_embedding")
        if extra is not None:
            if extra.ndim != 3 or extra.shape[0] != 1 or extra.shape[-1] != caption.shape[-1]:
                raise ValueError(
                    f"the template's extra_text_embedding has shape {tuple(extra.shape)}; "
                    f"expected [1, L, {caption.shape[-1]}]"
                )
            caption = torch.cat([caption, extra[0].to(device, caption.dtype)])
        return ZImageSample(
            x0=latents,
            noise=noise.to(device),
            sigma=sigma.to(device),
            caption=caption,
            kv=dict(cache.get("kv_cache") or {}),
            lora=cache.get("lora") or None,
        )

    def predict(
        self, dit: nn.Module, group: list[ZImageSample], kv: dict[str, tuple[Tensor, Tensor]] | None
    ) -> tuple[Tensor, Tensor]:
        """``(prediction, target)`` for a group of same-signature samples, ``[B, C, h, w]`` each."""
        x0 = torch.cat([s.x0 for s in group])
        noise = torch.cat([s.noise for s in group])
        sigma = torch.stack([s.sigma for s in group])
        x_t = add_noise(x0, noise, sigma[:, None, None, None])
        target = noise - x0
        dtype = next(dit.parameters()).dtype
        timestep = sigma * NUM_TRAIN_TIMESTEPS  # what the scheduler holds; the DiT reads 1 - sigma
        output = dit(
            x=list(x_t.to(dtype).unsqueeze(2).unbind(0)),  # [C, 1 frame, h, w] per sample
            t=((NUM_TRAIN_TIMESTEPS - timestep) / NUM_TRAIN_TIMESTEPS).to(dtype),
            cap_feats=[s.caption.to(dtype) for s in group],
            patch_size=dit.config.all_patch_size[0],  # the one the pipeline samples with
            kv_cache=kv,
        )
        return -torch.stack(output).squeeze(2), target
