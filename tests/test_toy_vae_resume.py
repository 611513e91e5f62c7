"""scripts/train_toy_vae.py resumes from a safetensors resume point (no pickle) exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from train_toy_vae import TOY_VAE_CONFIG, train  # noqa: E402

from diffsynth_templates.backbones.flux2_vae import Flux2VAE, Flux2VAEConfig  # noqa: E402


def fresh_vae() -> Flux2VAE:
    torch.manual_seed(0)
    return Flux2VAE(Flux2VAEConfig(**TOY_VAE_CONFIG))


def test_resume_point_is_safetensors_and_resuming_matches_an_uninterrupted_run(tmp_path):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    kwargs = dict(steps=4, batch=2, lr=1e-3, kl_weight=1e-6, seed=0, crop=16, full_steps=1)

    uninterrupted = fresh_vae()
    train(uninterrupted, images, **kwargs)

    state = tmp_path / "vae.resume.safetensors"
    first = fresh_vae()
    train(first, images, state_path=state, save_every=2, **kwargs)  # leaves the step-2 resume point
    with safe_open(str(state), framework="pt") as f:  # a plain safetensors file, not a pickle
        assert f.metadata()["step"] == "2"
    resumed = fresh_vae()
    train(resumed, images, state_path=state, save_every=2, **kwargs)  # runs steps 2 and 3 only
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
