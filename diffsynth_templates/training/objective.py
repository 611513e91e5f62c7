"""The flow-matching objective: what one training step computes from a batch of features.

For each sample: sigma is drawn like the base model was trained (``u ~ U[0, 1)``, then klein's
exponential time shift at ``TRAINING_MU``), ``x_t = (1 - sigma) x0 + sigma * noise``, and the DiT,
conditioned on the prompt and on the template's cache, predicts the velocity ``noise - x0``; the loss
is the mean squared error. The template's ``forward`` runs here, inside the graph, so its weights get
gradients through the frozen DiT.

Noise and sigma come from a generator seeded by ``(seed, step, micro-batch, sample id)`` on the CPU:
independent of device, rank, batch position and DataLoader workers, so a resumed run, stage II from
a cache and ``--task full`` all draw exactly the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pipelines.flow_match import TRAINING_MU, add_noise
from ..pipelines.flux2_pipeline import EDIT_TIME_STEP, _append_text_tokens, _grid_ids, _pack
from ..pipelines.flux2_prompt import text_position_ids
from ..pipelines.lora import applied_lora
from .features import SampleFeatures

logger = logging.getLogger(__name__)

# cache keys that shape training; the rest (inpaint_mask, input_image) only constrain sampling
TRAINED_CACHE_KEYS = ("kv_cache", "lora", "extra_text_embedding")


def noise_seed(seed: int, step: int, micro: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_noise(seed: int, shape: tuple[int, ...], mu: float = TRAINING_MU) -> tuple[Tensor, Tensor]:
    """``(sigma [], noise shape)`` in float32 on the CPU from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # exponential_time_shift; u = 0 gives sigma = 0
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return sigma.float(), noise


@dataclass
class TrainingContext:
    """What a template's ``forward(pipe=...)`` may read during training (the DiT, device, dtype)."""

    dit: nn.Module
    device: torch.device
    torch_dtype: torch.dtype


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


@dataclass
class _Sample:
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


class TrainingModule(nn.Module):
    """DiT (+ template, + DiT LoRA) with ``forward(batch, seeds) -> loss``; what DDP/DeepSpeed wrap."""

    def __init__(
        self,
        dit: nn.Module,
        template: nn.Module | None = None,
        dit_lora: nn.Module | None = None,
        mu: float = TRAINING_MU,
        gradient_checkpointing: bool = False,
        activation_offload: bool = False,
    ):
        super().__init__()
        self.dit, self.template, self.dit_lora = dit, template, dit_lora
        self.mu, self.gradient_checkpointing, self.activation_offload = (
            mu,
            gradient_checkpointing,
            activation_offload,
        )
        self._warned: set[str] = set()

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    @property
    def dit_dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype

    def forward(self, batch: list[SampleFeatures], seeds: list[int]) -> Tensor:
        if not batch:  # every sample of this micro-batch was skipped: a zero loss keeps ranks in step
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        offload = torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        with offload if self.activation_offload else contextlib.nullcontext():
            samples = [self._prepare(f, s) for f, s in zip(batch, seeds)]
            groups = _batchable_groups(samples)
            total = sum(self._loss(group) * len(group) for group in groups)
        return total / len(samples)

    # -- per sample -------------------------------------------------------------------------------

    def _prepare(self, features: SampleFeatures, seed: int) -> _Sample:
        device = self.device
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
        cache = self._template_cache(features)
        if "extra_text_embedding" in cache:
            embeds, text_ids = _append_text_tokens(
                embeds, text_ids, cache["extra_text_embedding"], "extra_text_embedding"
            )
        kv = dict(cache.get("kv_cache") or {})
        if kv:
            self.dit.validate_kv_cache(kv, batch_size=1, source="the template")
        return _Sample(
            x0=_pack(latents),
            noise=_pack(noise.to(device)),
            sigma=sigma.to(device),
            embeds=embeds,
            text_ids=text_ids,
            img_ids=_grid_ids(h, w, t=0).to(device),
            edit_tokens=edit_tokens,
            edit_ids=edit_ids,
            edit_shapes=tuple(tuple(e.shape) for e in features.edit_latents),
            kv=kv,
            lora=cache.get("lora") or None,
        )

    def _template_cache(self, features: SampleFeatures) -> dict[str, Any]:
        if self.template is None:
            return {}
        context = TrainingContext(self.dit, self.device, self.dit_dtype)
        cache = self.template(
            pipe=context,
            **_to(features.template, self.device),
            use_gradient_checkpointing=self.gradient_checkpointing,
            use_gradient_checkpointing_offload=self.activation_offload,
        )
        if not isinstance(cache, dict):
            raise TypeError(f"the template's forward returned {type(cache).__name__}; it must return a dict")
        for key in sorted(set(cache) - set(TRAINED_CACHE_KEYS) - self._warned):
            self._warned.add(key)
            logger.info("template cache key %r only constrains sampling; training ignores it", key)
        return cache

    # -- per group of same-shaped samples ---------------------------------------------------------

    def _loss(self, group: list[_Sample]) -> Tensor:
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
        kv = {
            name: tuple(torch.cat([s.kv[name][i].expand(1, -1, -1, -1) for s in group]) for i in (0, 1))
            for name in first.kv
        }
        dtype = self.dit_dtype
        with contextlib.ExitStack() as stack:
            if self.dit_lora is not None:
                stack.enter_context(applied_lora(self.dit, self.dit_lora.cache()))
            for row, sample in enumerate(group):
                if sample.lora:
                    rows = None if len(group) == 1 else slice(row, row + 1)
                    stack.enter_context(applied_lora(self.dit, sample.lora, rows=rows, source="the template"))
            prediction = self.dit(
                hidden_states=hidden.to(dtype),
                encoder_hidden_states=torch.cat([s.embeds for s in group]).to(dtype),
                timestep=sigma.to(dtype),
                img_ids=img_ids,
                txt_ids=first.text_ids,
                kv_cache=kv or None,
            )
        return F.mse_loss(prediction[:, : x0.shape[1]].float(), target.float())


def _signature(sample: _Sample) -> tuple:
    """Samples with equal signatures go through the DiT as one batch."""
    return (
        tuple(sample.x0.shape),
        tuple(sample.embeds.shape),
        sample.edit_shapes,
        tuple(sorted((n, tuple(k.shape[1:])) for n, (k, _) in sample.kv.items())),
        sample.text_ids.shape[0],
    )


def _batchable_groups(samples: list[_Sample]) -> list[list[_Sample]]:
    groups: dict[tuple, list[_Sample]] = {}
    for sample in samples:
        groups.setdefault(_signature(sample), []).append(sample)
    return list(groups.values())
