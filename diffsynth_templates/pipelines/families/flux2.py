"""FLUX.2-klein: packed 2x2-patch latent tokens with 4-axis position ids, reference images as extra
tokens, a DiT that reads sigma and predicts the velocity ``noise - x0`` directly.

``Flux2Adapter`` is the one place that turns latents, prompts and template caches into a DiT call;
``Flux2ImagePipeline`` samples through it and the trainer's objective trains through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...backbones.flux2_dit import Flux2DiT, Flux2DiTConfig
from ..common import PipelineInputError
from ..edit_kv import KV_MODEL_PIPELINE
from ..flow_match import TRAINING_MU, add_noise
from ..flux2_prompt import text_position_ids
from .base import Family, KVLayout
from .flux2_layouts import BFL

EDIT_TIME_STEP = 10  # reference images sit at t = 10, 20, ... in the position ids


def kv_layout(config: Flux2DiTConfig) -> KVLayout:
    blocks = tuple(f"double_{i}" for i in range(config.num_double_blocks)) + tuple(
        f"single_{i}" for i in range(config.num_single_blocks)
    )
    return KVLayout(blocks, config.num_heads, config.head_dim, config.in_channels, 1, config.text_dim)


def attention_modules(config: Flux2DiTConfig, double_blocks=None, single_blocks=None) -> tuple[str, ...]:
    """Image-stream ``to_q/to_k/to_v/to_out.0`` of the double blocks and ``attn.to_out`` of the single
    blocks (their fused QKV+MLP input is left out: 9x wider, it would dominate a template's size)."""
    doubles = range(config.num_double_blocks) if double_blocks is None else double_blocks
    singles = range(config.num_single_blocks) if single_blocks is None else single_blocks
    names = [
        f"transformer_blocks.{i}.attn.{p}" for i in doubles for p in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    names += [f"single_transformer_blocks.{i}.attn.to_out" for i in singles]
    return tuple(names)


KLEIN_BASE_SAMPLING = (50, 4.0, "FLUX.2-klein base model")
KLEIN_DISTILLED_SAMPLING = (4, 1.0, "distilled FLUX.2-klein model")
KLEIN_KV_SAMPLING = (4, 1.0, "FLUX.2-klein KV model (distilled)")


def recommended_sampling(index: dict, classes: set, name: str, variant: str | None):
    """Released klein pipelines: distilled (``is_distilled``) 4 steps without CFG, base 50 with cfg 4;
    the KV model (``Flux2KleinKVPipeline``, distilled) 4 steps without CFG."""
    if index.get("_class_name") == KV_MODEL_PIPELINE:
        return KLEIN_KV_SAMPLING
    if index.get("_class_name") != "Flux2KleinPipeline":
        return None
    return KLEIN_DISTILLED_SAMPLING if index.get("is_distilled") is True else KLEIN_BASE_SAMPLING


def draw_noise(seed: int, shape: tuple[int, ...], mu: float = TRAINING_MU) -> tuple[Tensor, Tensor]:
    """Training sigma: ``u ~ U[0, 1)`` through klein's exponential time shift at ``mu``; ``(sigma [],
    noise shape)`` in float32 on the CPU from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # exponential_time_shift; u = 0 gives sigma = 0
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return sigma.float(), noise


@dataclass
class Flux2Sample:
    """One training sample in FLUX.2's layout."""

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


class Flux2Adapter:
    """FLUX.2's model call: token layout, position ids, extra text and reference tokens, timestep, sign."""

    edit_time_step = EDIT_TIME_STEP

    # -- layout -----------------------------------------------------------------------------------

    @staticmethod
    def pack(latents: Tensor) -> Tensor:
        """``[B, C, h, w]`` -> tokens ``[B, h * w, C]`` in row-major order."""
        return latents.flatten(2).transpose(1, 2)

    @staticmethod
    def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    @staticmethod
    def grid_ids(h: int, w: int, t: int) -> Tensor:
        """Position ids (t, row, col, 0) for an ``h x w`` token grid, row-major."""
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)

    @staticmethod
    def append_text_tokens(
        embeds: Tensor, text_ids: Tensor, extra: Tensor, name: str
    ) -> tuple[Tensor, Tensor]:
        """Extra text tokens go after the prompt, continuing its sequence positions."""
        if (
            extra.ndim != 3
            or extra.shape[-1] != embeds.shape[-1]
            or extra.shape[0] not in (1, embeds.shape[0])
        ):
            raise PipelineInputError(
                f"{name} has shape {tuple(extra.shape)}; expected [1 or {embeds.shape[0]}, L, {embeds.shape[-1]}]"
            )
        length = embeds.shape[1]
        extra_ids = torch.zeros(
            extra.shape[1], text_ids.shape[-1], dtype=text_ids.dtype, device=text_ids.device
        )
        extra_ids[:, -1] = torch.arange(length, length + extra.shape[1], device=text_ids.device)
        extra = extra.to(embeds.device, embeds.dtype).expand(embeds.shape[0], -1, -1)
        return torch.cat([embeds, extra], dim=1), torch.cat([text_ids, extra_ids])

    def reference_tokens(self, latents: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """Reference (edit) images' latents ``[1, C, h_i, w_i]`` as extra image tokens, each at its own
        time position t = 10, 20, ..."""
        tokens = torch.cat([self.pack(x) for x in latents], dim=1)
        ids = [
            self.grid_ids(x.shape[-2], x.shape[-1], t=EDIT_TIME_STEP * (i + 1)) for i, x in enumerate(latents)
        ]
        return tokens, torch.cat(ids).to(device)

    # -- the call ---------------------------------------------------------------------------------

    @staticmethod
    def sampling_timestep(t: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """The scheduler's ``sigma * 1000`` as the DiT's sigma: ``(sigma * 1000) / 1000`` in the latents'
        dtype, as the reference computes it."""
        return (t.expand(batch).to(dtype)) / 1000

    @staticmethod
    def training_timestep(sigma: Tensor, dtype: torch.dtype) -> Tensor:
        return sigma.to(dtype)

    @staticmethod
    def forward(
        dit: nn.Module, hidden: Tensor, timestep: Tensor, img_ids, embeds, text_ids, kv_cache
    ) -> Tensor:
        """The DiT's output for every token (image, then reference); its sign is the velocity's."""
        return dit(
            hidden_states=hidden,
            encoder_hidden_states=embeds,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=text_ids,
            kv_cache=kv_cache,
        )

    @staticmethod
    def to_velocity(output: Tensor) -> Tensor:
        """The DiT predicts the velocity ``noise - x0`` itself."""
        return output

    @staticmethod
    def guide(pos: Tensor, neg: Tensor, cfg_scale: float) -> Tensor:
        """Real CFG on velocities: ``neg + cfg_scale * (pos - neg)``."""
        return neg + cfg_scale * (pos - neg)

    # -- training ---------------------------------------------------------------------------------

    def prepare(
        self, features: Any, sigma: Tensor, noise: Tensor, cache: dict[str, Any], device
    ) -> Flux2Sample:
        """A stage-I sample (latents ``[C, h, w]``, prompt ``[L, D]``, edit latents) with the template's
        cache, in FLUX.2's token layout."""
        latents = features.latents.to(device, torch.float32)[None]  # [1, C, h, w]
        h, w = latents.shape[-2:]
        embeds = features.prompt_embeds.to(device)[None]
        text_ids = text_position_ids(1, embeds.shape[1], device)[0]
        edit_tokens = edit_ids = None
        if features.edit_latents:
            edit_tokens, edit_ids = self.reference_tokens(
                [e.to(device, torch.float32)[None] for e in features.edit_latents], device
            )
        if "extra_text_embedding" in cache:
            embeds, text_ids = self.append_text_tokens(
                embeds, text_ids, cache["extra_text_embedding"], "extra_text_embedding"
            )
        return Flux2Sample(
            x0=self.pack(latents),
            noise=self.pack(noise.to(device)),
            sigma=sigma.to(device),
            embeds=embeds,
            text_ids=text_ids,
            img_ids=self.grid_ids(h, w, t=0).to(device),
            edit_tokens=edit_tokens,
            edit_ids=edit_ids,
            edit_shapes=tuple(tuple(e.shape) for e in features.edit_latents),
            kv=dict(cache.get("kv_cache") or {}),
            lora=cache.get("lora") or None,
        )

    def predict(self, dit: nn.Module, group: list[Flux2Sample], kv) -> tuple[Tensor, Tensor]:
        """``(prediction, target)`` for same-signature samples, ``[B, N, C]`` each; reference tokens are
        not scored."""
        first = group[0]
        x0 = torch.cat([s.x0 for s in group])
        noise = torch.cat([s.noise for s in group])
        sigma = torch.stack([s.sigma for s in group])
        x_t = add_noise(x0, noise, sigma[:, None, None])
        hidden, img_ids = x_t, first.img_ids
        if first.edit_tokens is not None:
            hidden = torch.cat([x_t, torch.cat([s.edit_tokens for s in group])], dim=1)
            img_ids = torch.cat([img_ids, first.edit_ids])
        dtype = next(dit.parameters()).dtype
        embeds = torch.cat([s.embeds for s in group]).to(dtype)
        timestep = self.training_timestep(sigma, dtype)
        prediction = self.forward(dit, hidden.to(dtype), timestep, img_ids, embeds, first.text_ids, kv)
        return prediction[:, : x0.shape[1]], noise - x0


FLUX2 = Family(
    name="flux2",
    title="FLUX.2",
    class_names=("Flux2KleinPipeline", KV_MODEL_PIPELINE, "Flux2Pipeline", "Flux2Transformer2DModel"),
    dit_class=Flux2DiT,
    dit_config_class=Flux2DiTConfig,
    pipeline="diffsynth_templates.pipelines.flux2_pipeline:Flux2ImagePipeline",
    kv_layout=kv_layout,
    name_prefixes=("double_", "single_", "transformer_blocks.", "single_transformer_blocks."),
    attention_modules=attention_modules,
    recommended_sampling=recommended_sampling,
    tiny_spec="diffsynth_templates.pipelines.random_init:RandomPipelineSpec",
    presets=("klein_4b", "klein_9b"),
    adapter=Flux2Adapter(),
    draw_noise=draw_noise,
    checkpoint_layout=BFL,
    supports_edit_images=True,
    supports_inpainting=True,
    supports_guidance=True,
    default_cfg_scale=4.0,
)
