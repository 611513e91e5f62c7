"""The flow-matching objective: what one training step computes from a batch of features.

For each sample: sigma is drawn like the base model was trained (``noise``: FLUX.2-klein's
exponential shift, Z-Image's static shift), ``x_t = (1 - sigma) x0 + sigma * noise``, and the DiT,
conditioned on the prompt and on the template's cache, predicts the velocity ``noise - x0``; the loss
is the mean squared error. The template's ``forward`` runs here, inside the graph, so its weights get
gradients through the frozen DiT.

What is generic lives here (the template's cache, KV validation, LoRA application, batching samples
of one shape, the loss, ``FamilyObjective``); what depends on the base model (the sigma draw, latent
layout, position ids, the DiT call, the sign of its output) is the family's (``pipelines.families``:
its ``draw_noise`` and its model-call adapter, the same one its pipeline samples through), picked from
the DiT's class.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.attention import module_attribute
from ..loading.tensor_tree import move_tensors
from ..pipelines.families import Family, family_of_dit
from ..pipelines.flow_match import TRAINING_MU
from ..pipelines.lora import applied_lora
from ..templates.base import TemplateError
from .noise import draw_noise, noise_seed

__all__ = [
    "TRAINED_CACHE_KEYS",
    "DiTObjective",
    "FamilyObjective",
    "TrainingContext",
    "TrainingModule",
    "draw_noise",
    "noise_seed",
]

logger = logging.getLogger(__name__)

# cache keys that shape training; the rest (inpaint_mask, input_image) only constrain sampling
TRAINED_CACHE_KEYS = ("kv_cache", "lora", "extra_text_embedding")


class SampleFeatures(Protocol):
    """What the objective reads of a stage-I sample (``features.SampleFeatures``)."""

    id: str
    line: int
    latents: Tensor  # [C, h, w]
    prompt_embeds: Tensor  # [L, D]
    edit_latents: list[Tensor]
    template: dict[str, Any]


class PreparedSample(Protocol):
    """One sample ready for the DiT (its backbone's layout), with the template's KV and LoRA."""

    kv: dict[str, tuple[Tensor, Tensor]]
    lora: dict[str, Tensor] | None

    def signature(self) -> tuple: ...


class DiTObjective(Protocol):
    """What ``TrainingModule`` calls (``FamilyObjective``, or a test's stand-in)."""

    def prepare(
        self, features: SampleFeatures, seed: int, cache: dict[str, Any], device: torch.device
    ) -> PreparedSample: ...

    def predict(
        self, dit: nn.Module, group: list, kv: dict[str, tuple[Tensor, Tensor]] | None
    ) -> tuple[Tensor, Tensor]: ...


@dataclass
class FamilyObjective:
    """The objective of one backbone family: its training sigma draw, then its model-call adapter."""

    family: Family
    mu: float = TRAINING_MU  # only FLUX.2's draw reads it; Z-Image trains on its static shift

    def prepare(self, features: SampleFeatures, seed: int, cache: dict[str, Any], device: torch.device):
        sigma, noise = self.family.draw_noise(seed, (1, *features.latents.shape), self.mu)
        return self.family.adapter.prepare(features, sigma, noise, cache, device)

    def predict(self, dit: nn.Module, group: list, kv: dict[str, tuple[Tensor, Tensor]] | None):
        """``(prediction, target)`` for a group of same-signature samples."""
        return self.family.adapter.predict(dit, group, kv)


@dataclass
class TrainingContext:
    """What a template's ``forward(pipe=...)`` may read during training (the DiT, device, dtype)."""

    dit: nn.Module
    device: torch.device
    torch_dtype: torch.dtype


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
        objective: DiTObjective | None = None,
    ):
        super().__init__()
        self.dit, self.template, self.dit_lora = dit, template, dit_lora
        # ``mu`` only shapes FLUX.2's sigmas; Z-Image draws them on its own static shift
        self.objective = objective if objective is not None else FamilyObjective(family_of_dit(dit), mu)
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

    def _prepare(self, features: SampleFeatures, seed: int) -> PreparedSample:
        cache = self._template_cache(features)
        sample = self.objective.prepare(features, seed, cache, self.device)
        if sample.kv:
            self.dit.validate_kv_cache(sample.kv, batch_size=1, source="the template")
        return sample

    def _template_cache(self, features: SampleFeatures) -> dict[str, Any]:
        if self.template is None:
            return {}
        context = TrainingContext(self.dit, self.device, self.dit_dtype)
        cache = self.template(
            pipe=context,
            **move_tensors(features.template, self.device, non_blocking=True),
            use_gradient_checkpointing=self.gradient_checkpointing,
            use_gradient_checkpointing_offload=self.activation_offload,
        )
        if not isinstance(cache, dict):
            raise TemplateError(
                f"the template's forward returned {type(cache).__name__}; it must return a dict"
            )
        for key in sorted(set(cache) - set(TRAINED_CACHE_KEYS) - self._warned):
            self._warned.add(key)
            logger.info("template cache key %r only constrains sampling; training ignores it", key)
        return cache

    # -- per group of same-shaped samples ---------------------------------------------------------

    def _loss(self, group: list[PreparedSample]) -> Tensor:
        first = group[0]
        kv = {
            name: tuple(torch.cat([s.kv[name][i].expand(1, -1, -1, -1) for s in group]) for i in (0, 1))
            for name in first.kv
        }
        branches = []  # (lora, rows, source): the DiT LoRA and each sample's template LoRA
        if self.dit_lora is not None:
            branches.append((self.dit_lora.cache(), None, None))
        for row, sample in enumerate(group):
            if sample.lora:
                branches.append(
                    (sample.lora, None if len(group) == 1 else slice(row, row + 1), "the template")
                )
        scope = functools.partial(_lora_branches, self.dit, branches)
        with scope(), _recomputed_with(self.dit, scope):
            prediction, target = self.objective.predict(self.dit, group, kv or None)
        return F.mse_loss(prediction.float(), target.float())


@contextlib.contextmanager
def _lora_branches(dit: nn.Module, branches: list[tuple[Any, slice | None, str | None]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for lora, rows, source in branches:
            stack.enter_context(applied_lora(dit, lora, rows=rows, source=source))
        yield


@contextlib.contextmanager
def _recomputed_with(dit: nn.Module, scope) -> Iterator[None]:
    """Gradient checkpointing recomputes blocks in backward, after ``scope`` closed: the DiT reopens
    it around each recomputation (``backbones.checkpointing``), so the LoRA branches are there too."""
    module = getattr(dit, "module", dit)  # under DDP the wrapper holds the DiT
    with module_attribute(module, "recompute_context", scope):
        yield


def _batchable_groups(samples: list[PreparedSample]) -> list[list[PreparedSample]]:
    """Samples with equal signatures go through the DiT as one batch."""
    groups: dict[tuple, list[PreparedSample]] = {}
    for sample in samples:
        groups.setdefault(sample.signature(), []).append(sample)
    return list(groups.values())
