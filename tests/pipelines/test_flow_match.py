"""The klein schedule and Euler step against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsynth_templates.pipelines.flow_match import (
    add_noise,
    compute_empirical_mu,
    euler_step,
    klein_schedule,
    velocity_towards,
)

KLEIN_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)


@pytest.mark.parametrize("steps,seq_len", [(4, 16), (28, 1024), (50, 4096), (50, 6000)])
def test_schedule_matches_diffusers(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as ref_mu

    assert compute_empirical_mu(seq_len, steps) == ref_mu(seq_len, steps)
    ref = FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER)
    ref.set_timesteps(
        sigmas=np.linspace(1.0, 1 / steps, steps), mu=ref_mu(seq_len, steps), num_inference_steps=steps
    )
    ours = klein_schedule(steps, seq_len)
    assert torch.equal(ours.sigmas, ref.sigmas)
    assert torch.equal(ours.timesteps, ref.timesteps)


def test_euler_steps_match_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    steps = 6
    ref = FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(64, steps))
    ours = klein_schedule(steps, 64)
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 64, 8, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 64, 8, generator=g)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = euler_step(x_ours, v, ours.sigmas[i], ours.sigmas[i + 1])
    assert torch.equal(x_ref, x_ours)


def test_denoising_strength_starts_partway():
    full, half = klein_schedule(10, 256), klein_schedule(10, 256, denoising_strength=0.5)
    assert len(half) == 10 and half.sigmas[-1] == 0
    assert half.initial_sigma < full.initial_sigma
    assert full.initial_sigma == pytest.approx(1.0)


def test_straight_path_lands_on_target():
    sched = klein_schedule(8, 64)
    g = torch.Generator().manual_seed(1)
    target, noise = torch.randn(1, 64, 8, generator=g), torch.randn(1, 64, 8, generator=g)
    x = add_noise(target, noise, sched.sigmas[0])
    for i in range(len(sched)):
        x = euler_step(x, velocity_towards(x, target, sched.sigmas[i]), sched.sigmas[i], sched.sigmas[i + 1])
    assert (x - target).abs().max() <= 1e-6


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_step_counts_are_named(bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        klein_schedule(bad, 64)


def test_bad_strength_is_named():
    with pytest.raises(ValueError, match="denoising_strength"):
        klein_schedule(4, 64, denoising_strength=1.5)
