"""Per-sample noise and sigma for the flow-matching objective, drawn from a private seeded generator.

Each backbone draws sigma the way DiffSynth-Studio trains it:

* FLUX.2-klein: ``u ~ U[0, 1)``, then klein's exponential time shift at ``mu`` (0.8);
* Z-Image: a timestep index uniform over the 1000-step training grid ``linspace(1, 0, 1001)[:-1]``,
  warped by the static shift ``s * x / (1 + (s - 1) * x)`` with ``s = 3`` (what
  ``FlowMatchScheduler("Z-Image").set_timesteps(1000, training=True)`` builds), so sigma lies in
  ``[0.003, 1]``.

The seed comes from ``(seed, step, micro-batch, sample id)``: independent of device, rank, batch
position and DataLoader workers, so a resumed run, stage II from a cache and ``--task full`` all draw
exactly the same numbers.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from ..pipelines.flow_match import NUM_TRAIN_TIMESTEPS, TRAINING_MU

ZIMAGE_TRAINING_SHIFT = 3.0  # DiffSynth-Studio's Z-Image training shift (its scheduler default)


def noise_seed(seed: int, step: int, micro: int, sample_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw_noise(seed: int, shape: tuple[int, ...], mu: float = TRAINING_MU) -> tuple[Tensor, Tensor]:
    """FLUX.2: ``(sigma [], noise shape)`` in float32 on the CPU from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand((), generator=generator, dtype=torch.float64)
    sigma = math.exp(mu) / (math.exp(mu) + (1 / u - 1))  # exponential_time_shift; u = 0 gives sigma = 0
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return sigma.float(), noise


def shifted_training_sigmas(shift: float = ZIMAGE_TRAINING_SHIFT) -> Tensor:
    """The Z-Image training grid: ``NUM_TRAIN_TIMESTEPS`` statically shifted sigmas, 1 first (float32)."""
    sigmas = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def draw_shifted_noise(
    seed: int, shape: tuple[int, ...], shift: float = ZIMAGE_TRAINING_SHIFT
) -> tuple[Tensor, Tensor]:
    """Z-Image: ``(sigma [], noise shape)``, sigma a uniformly chosen entry of ``shifted_training_sigmas``."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, NUM_TRAIN_TIMESTEPS, (), generator=generator)
    sigma = shifted_training_sigmas(shift)[index]
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    return sigma, noise
