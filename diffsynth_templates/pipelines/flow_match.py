"""Flow-matching schedule and Euler sampler for FLUX.2-klein.

Klein samples ``sigmas = linspace(1, 1/N, N)`` and warps them with an exponential time shift whose
``mu`` depends on the image sequence length and the step count (an empirical fit published with the
model). Numbers are computed in the same precision order as the reference scheduler so the sampled
trajectory matches it bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .common import PipelineInputError

NUM_TRAIN_TIMESTEPS = 1000
TRAINING_MU = 0.8  # the shift DiffSynth-Studio trains klein templates with (no resolution dependence)


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """The klein shift: linear in sequence length, interpolated between fits for 10 and 200 steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    mu_200 = a2 * image_seq_len + b2
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0
    intercept = mu_200 - 200.0 * slope
    return float(slope * num_steps + intercept)


def exponential_time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


@dataclass(frozen=True)
class FlowMatchSchedule:
    """``sigmas`` has N + 1 entries (the last is 0); ``timesteps`` = sigmas[:-1] * 1000, as the DiT is fed."""

    sigmas: Tensor
    timesteps: Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def initial_sigma(self) -> float:
        return float(self.sigmas[0])


def klein_schedule(
    num_inference_steps: int,
    image_seq_len: int,
    denoising_strength: float = 1.0,
    mu: float | None = None,
    device: str | torch.device = "cpu",
) -> FlowMatchSchedule:
    """Sigmas for ``num_inference_steps`` Euler steps.

    ``denoising_strength`` < 1 starts partway (img2img): the first sigma becomes
    ``1/N + (1 - 1/N) * strength`` before the shift, as DiffSynth-Studio does.
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise PipelineInputError(
            f"num_inference_steps must be a positive integer, got {num_inference_steps!r}"
        )
    if not 0.0 < denoising_strength <= 1.0:
        raise PipelineInputError(f"denoising_strength must be in (0, 1], got {denoising_strength}")
    n = num_inference_steps
    sigma_min = 1.0 / n
    sigma_start = sigma_min + (1.0 - sigma_min) * denoising_strength if denoising_strength < 1 else 1.0
    sigmas = np.linspace(sigma_start, sigma_min, n).astype(np.float32)
    mu = compute_empirical_mu(image_seq_len, n) if mu is None else mu
    sigmas = exponential_time_shift(mu, sigmas)
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32, device=device)
    timesteps = sigmas * NUM_TRAIN_TIMESTEPS
    return FlowMatchSchedule(torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps)


def euler_step(latents: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """One Euler step of dx/dsigma = v, accumulated in float32 and returned in the velocity's dtype."""
    return (latents.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


def velocity_towards(latents: Tensor, target: Tensor, sigma: Tensor) -> Tensor:
    """The velocity that makes the straight path from ``latents`` land on ``target`` at sigma = 0."""
    return (latents - target) / sigma


def add_noise(clean: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    return (1 - sigma) * clean + sigma * noise
