"""Step caching (DESIGN.md 4.9): reuse the DiT's block work across denoising steps.

Between neighbouring steps the DiT's blocks change the image tokens by nearly the same amount, so
on most steps that change (the *residual* of the block stack) can be forecast instead of computed.
Per DiT call a ``BlockCache`` is consulted by the DiT's forward after its first ``probe_blocks``
blocks (``backbones/flux2_dit.py``, ``backbones/zimage_dit.py``):

- it measures how far the probe signal (the first blocks' output, or with ``probe_blocks=0`` the
  first block's timestep-modulated input, TeaCache's signal) has moved since the last computed
  step, relative to its size; below ``threshold`` the rest of the stack is skipped (first-block /
  DBCache style), with at most ``max_skips`` skipped steps in a row (and at most
  ``max_skip_fraction`` of the call's steps) and the first ``warmup_steps`` and the last
  ``final_steps`` steps always computed;
- a skipped step's residual is forecast from the last computed ones by a Taylor series in sigma
  (TaylorSeer style; ``order=0`` reuses the last residual as First-Block-Cache does), added to the
  fresh probe output; the DiT's output head then runs as usual, on this step's timestep.

A cache follows one stream of DiT calls: the positive side, the negative side, or both batched.
Its state is per batch row (each row's residuals and change); a step is skipped only when every row
may skip, so rows never mix. Templates are static across steps, which is what makes this exact on
computed steps: the same KV tokens and LoRA branches apply as without caching; when a step window
(``ScheduledKVCache``) opens or closes, the conditioning changes, so that step is computed and the
history restarts.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from ..backbones.attention import module_attribute
from ..errors import DiffSynthTemplatesError

if TYPE_CHECKING:  # infer.py reads the presets before it imports torch
    import torch
    from torch import Tensor

logger = logging.getLogger(__name__)


class StepCacheError(DiffSynthTemplatesError, ValueError):
    """A ``step_cache`` argument is not a preset name, a ``StepCacheConfig`` or None, or has a bad value."""


@dataclass(frozen=True)
class StepCacheConfig:
    """How aggressively denoising steps reuse block work (see the module docstring)."""

    threshold: float = 0.25  # relative change of the probe signal since the last computed step
    probe_blocks: int = 0  # leading blocks run on every step; 0: probe the modulated input (free)
    max_skips: int = 6  # skipped steps in a row, at most
    # ... and at most this fraction of the call's steps (rounded down), so that a short schedule,
    # whose every step moves further, skips proportionally fewer in a row (20 steps: 2)
    max_skip_fraction: float = 0.12
    order: int = 1  # Taylor order of the residual forecast (0: reuse the last residual)
    warmup_steps: int = 1  # the first steps, always computed
    final_steps: int = 1  # the last steps, always computed

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
            raise StepCacheError(f"StepCacheConfig.threshold must be a number >= 0, got {self.threshold!r}")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            raise StepCacheError(f"StepCacheConfig.threshold must be finite and >= 0, got {self.threshold}")
        fraction = self.max_skip_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise StepCacheError(f"StepCacheConfig.max_skip_fraction must be in [0, 1], got {fraction!r}")
        bounds = {"probe_blocks": 0, "max_skips": 0, "order": 0, "warmup_steps": 1, "final_steps": 0}
        for name, low in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StepCacheError(f"StepCacheConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.order > 3:
            raise StepCacheError(
                f"StepCacheConfig.order must be 0..3, got {self.order}: higher-order extrapolation "
                "from a few past steps amplifies their noise"
            )


# measured on the toy world (benchmarks/step_cache.py; 50 steps, cfg 1; README, "Step caching")
PRESETS: dict[str, StepCacheConfig] = {
    "quality": StepCacheConfig(threshold=0.15, max_skips=4, max_skip_fraction=0.08),
    "balanced": StepCacheConfig(threshold=0.25, max_skips=6, max_skip_fraction=0.12),
    "fast": StepCacheConfig(threshold=0.4, max_skips=8, max_skip_fraction=0.16),
}


def resolve_step_cache(value: str | StepCacheConfig | None) -> StepCacheConfig | None:
    """``None`` (off), a preset name or a config, as a config; anything else is a clear error."""
    if value is None or isinstance(value, StepCacheConfig):
        return value
    if isinstance(value, str) and value in PRESETS:
        return PRESETS[value]
    raise StepCacheError(
        f"step_cache must be None, one of the presets {sorted(PRESETS)} or a StepCacheConfig, got {value!r}"
    )


@dataclass
class StepCacheStats:
    """What a call's step cache did, summed over its streams (CFG sides); read it from
    ``pipe.step_cache_stats`` after a call. A block computation is one block's forward over one
    DiT call's batch."""

    computed_blocks: int = 0
    skipped_blocks: int = 0
    computed_steps: int = 0  # DiT calls that ran the whole stack
    skipped_steps: int = 0  # DiT calls that forecast all but the probe blocks
    streams: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total_blocks(self) -> int:
        return self.computed_blocks + self.skipped_blocks

    @property
    def reduction(self) -> float:
        """Block computations without caching over those with it (``4.0``: 4x fewer)."""
        return self.total_blocks / max(self.computed_blocks, 1)

    def add(self, stream: str, computed: int, skipped: int) -> None:
        self.computed_blocks += computed
        self.skipped_blocks += skipped
        step = "skipped_steps" if skipped else "computed_steps"
        setattr(self, step, getattr(self, step) + 1)
        counts = self.streams.setdefault(stream, {f.name: 0 for f in fields(self)[:4]})
        counts["computed_blocks"] += computed
        counts["skipped_blocks"] += skipped
        counts[step] += 1


def relative_change(now: Tensor, before: Tensor) -> Tensor:
    """Per batch row: mean |now - before| / mean |before| (float32)."""
    now, before = now.float().flatten(1), before.float().flatten(1)
    return (now - before).abs().mean(1) / before.abs().mean(1).clamp_min(1e-12)


def taylor_forecast(history: list[tuple[float, Tensor]], sigma: float) -> Tensor:
    """Extrapolate residuals ``[(sigma_j, R_j)]`` (oldest first) to ``sigma``: the polynomial through
    them in Newton form, i.e. a Taylor series whose derivatives are divided differences."""
    sigmas = [s for s, _ in history]
    table = [r for _, r in history]  # divided differences, built in place, newest point last
    coefficients = [table[-1]]
    for level in range(1, len(history)):
        table = [(table[j + 1] - table[j]) / (sigmas[j + level] - sigmas[j]) for j in range(len(table) - 1)]
        coefficients.append(table[-1])
    out, factor = coefficients[0], 1.0
    for level in range(1, len(coefficients)):
        factor = factor * (sigma - sigmas[-level])
        out = out + factor * coefficients[level]
    return out


class BlockCache:
    """One stream's state (its residual history per batch row); the DiT's forward calls ``reuse``
    after the probe blocks and, when it ran the whole stack, ``record``."""

    def __init__(self, config: StepCacheConfig, stats: StepCacheStats, name: str):
        self.config, self.stats, self.name = config, stats, name
        self.probe_blocks = config.probe_blocks
        self.history: list[tuple[float, Tensor]] = []  # (sigma, residual float32) of computed steps
        self.reference: Tensor | None = None  # the probe signal at the last computed step
        self.skips = 0  # skipped steps since the last computed one
        self.condition_key: object = None
        self.step, self.num_steps, self.sigma = 0, 1, 1.0
        self.max_skips = config.max_skips
        self._probe: Tensor | None = None
        self._skippable = 0

    def begin(self, step: int, num_steps: int, sigma: float, condition_key: object) -> None:
        """Where the loop is; a new ``condition_key`` (a KV window opened or closed) restarts the history."""
        if condition_key != self.condition_key:
            self.history, self.reference, self.skips = [], None, 0
            self.condition_key = condition_key
        self.step, self.num_steps, self.sigma = step, num_steps, sigma
        self.max_skips = min(
            self.config.max_skips, math.floor(self.config.max_skip_fraction * num_steps + 1e-9)
        )

    def must_compute(self) -> bool:
        cfg = self.config
        return (
            self.step < cfg.warmup_steps
            or self.step >= self.num_steps - cfg.final_steps
            or self.skips >= self.max_skips
            or self.reference is None
            or not self.history
        )

    def reuse(self, hidden: Tensor, signal: Tensor, skippable: int) -> Tensor | None:
        """The forecast output of the remaining ``skippable`` blocks for ``hidden``, or None: run them."""
        self._skippable = skippable
        if not self.must_compute() and self.reference.shape == signal.shape:
            change = relative_change(signal, self.reference)
            if bool((change < self.config.threshold).all()):
                self.skips += 1
                self.stats.add(self.name, self.probe_blocks, skippable)
                residual = taylor_forecast(self.history, self.sigma)
                return (hidden.float() + residual).to(hidden.dtype)
        self.skips = 0
        self.reference = signal.detach()
        self._probe = hidden.detach()
        return None

    def record(self, out: Tensor) -> None:
        """The whole stack ran: its residual joins the history (the last ``order + 1`` are kept)."""
        residual = out.detach().float() - self._probe.float()
        if self.history and self.history[-1][1].shape != residual.shape:
            self.history = []
        self.history = [*self.history, (self.sigma, residual)][-(self.config.order + 1) :]
        self._probe = None
        self.stats.add(self.name, self.probe_blocks + self._skippable, 0)


class StepCacheSession:
    """The step cache of one pipeline call: a ``BlockCache`` per stream, the shared stats."""

    def __init__(self, config: StepCacheConfig, sigmas: Tensor):
        self.config = config
        self.sigmas = [float(s) for s in sigmas]
        self.num_steps = len(self.sigmas) - 1
        self.step = 0
        self.stats = StepCacheStats()
        self.caches: dict[str, BlockCache] = {}

    def finish(self) -> StepCacheStats:
        """The call's statistics, logged once."""
        s = self.stats
        logger.info(
            "step cache: %d of %d block computations skipped (%.2fx fewer), %d of %d DiT calls forecast",
            s.skipped_blocks, s.total_blocks, s.reduction, s.skipped_steps, s.computed_steps + s.skipped_steps,
        )  # fmt: skip
        return s

    @contextlib.contextmanager
    def stream(self, model: torch.nn.Module, name: str, condition_key: object) -> Iterator[None]:
        """Inside, ``model``'s forward consults the cache of stream ``name`` at the current step."""
        cache = self.caches.get(name)
        if cache is None:
            cache = self.caches[name] = BlockCache(self.config, self.stats, name)
        cache.begin(self.step, self.num_steps, self.sigmas[self.step], condition_key)
        with module_attribute(model, "block_cache", cache):
            yield
