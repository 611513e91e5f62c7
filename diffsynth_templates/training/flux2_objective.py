"""The FLUX.2-klein side of the objective: packed latent tokens, text/edit position ids, the DiT call.

Per sample: sigma from klein's exponential shift (``noise.draw_noise``), latents packed to tokens
``[1, h*w, 128]``, the prompt's ids, edit images as reference tokens at time positions 10, 20, ...;
the template's ``extra_text_embedding`` continues the prompt. The DiT predicts the velocity
``noise - x0`` directly; only the target's tokens are scored (reference tokens are not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..pipelines.flow_match import TRAINING_MU, add_noise
from ..pipelines.flux2_pipeline import EDIT_TIME_STEP, _append_text_tokens, _grid_ids, _pack
from ..pipelines.flux2_prompt import text_position_ids
from .noise import draw_noise

if TYPE_CHECKING:
    from .features import SampleFeatures


@dataclass
class Flux2Sample:
    x0: Tensor  # [1, N, C]
    noise: Tensor
    sigma: Tensor
    embeds: Tensor  # [1, L, D]
    text_ids: Tensor  # [L, 4]
    img_ids: Tensor  # [N, 4]
    edit_tokens: Tensor | None  # [1, M, C]
    edit_ids: Tensor | None
    edit_shapes: tuple[tuple[int, ...], ...]
    kv: dict[str, tuple[Tensor, Tensor]]
    lora: dict[str, Tensor] | None

    def signature(self) -> tuple:
        """Samples with equal signatures go through the DiT as one batch."""
        return (
            tuple(self.x0.shape),
            tuple(self.embeds.shape),
            self.edit_shapes,
            tuple(sorted((n, tuple(k.shape[1:])) for n, (k, _) in self.kv.items())),
            self.text_ids.shape[0],
        )


@dataclass
class Flux2Objective:
    mu: float = TRAINING_MU

    def prepare(
        self, features: SampleFeatures, seed: int, cache: dict[str, Any], device: torch.device
    ) -> Flux2Sample:
        latents = features.latents.to(device, torch.float32)[None]  # [1, C, h, w]
        sigma, noise = draw_noise(seed, tuple(latents.shape), self.mu)
        h, w = latents.shape[-2:]
        embeds = features.prompt_embeds.to(device)[None]
        text_ids = text_position_ids(1, embeds.shape[1], device)[0]
        edit_tokens = edit_ids = None
        if features.edit_latents:
            edit_tokens = torch.cat(
                [_pack(e.to(device, torch.float32)[None]) for e in features.edit_latents], dim=1
            )
            edit_ids = torch.cat(
                [
                    _grid_ids(e.shape[-2], e.shape[-1], t=EDIT_TIME_STEP * (i + 1))
                    for i, e in enumerate(features.edit_latents)
                ]
            ).to(device)
        if "extra_text_embedding" in cache:
            embeds, text_ids = _append_text_tokens(
                embeds, text_ids, cache["extra_text_embedding"], "extra_text_embedding"
            )
        return Flux2Sample(
            x0=_pack(latents),
            noise=_pack(noise.to(device)),
            sigma=sigma.to(device),
            embeds=embeds,
            text_ids=text_ids,
            img_ids=_grid_ids(h, w, t=0).to(device),
            edit_tokens=edit_tokens,
            edit_ids=edit_ids,
            edit_shapes=tuple(tuple(e.shape) for e in features.edit_latents),
            kv=dict(cache.get("kv_cache") or {}),
            lora=cache.get("lora") or None,
        )

    def predict(
        self, dit: nn.Module, group: list[Flux2Sample], kv: dict[str, tuple[Tensor, Tensor]] | None
    ) -> tuple[Tensor, Tensor]:
        """``(prediction, target)`` for a group of same-signature samples, ``[B, N, C]`` each."""
        first = group[0]
        x0 = torch.cat([s.x0 for s in group])
        noise = torch.cat([s.noise for s in group])
        sigma = torch.stack([s.sigma for s in group])
        x_t = add_noise(x0, noise, sigma[:, None, None])
        target = noise - x0
        hidden, img_ids = x_t, first.img_ids
        if first.edit_tokens is not None:
            hidden = torch.cat([x_t, torch.cat([s.edit_tokens for s in group])], dim=1)
            img_ids = torch.cat([img_ids, first.edit_ids])
        dtype = next(dit.parameters()).dtype
        prediction = dit(
            hidden_states=hidden.to(dtype),
            encoder_hidden_states=torch.cat([s.embeds for s in group]).to(dtype),
            timestep=sigma.to(dtype),
            img_ids=img_ids,
            txt_ids=first.text_ids,
            kv_cache=kv,
        )
        return prediction[:, : x0.shape[1]], target
