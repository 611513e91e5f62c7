"""The flow-matching objective on a random tiny DiT: what reaches the DiT, what gets gradients."""

from __future__ import annotations

import pytest
import torch

import tests.training.archs  # noqa: F401  (registers test_everything)
from diffsynth_templates.pipelines.random_init import random_flux2_pipeline
from diffsynth_templates.templates import build_architecture
from diffsynth_templates.training.dit_lora import DiTLoRA
from diffsynth_templates.training.features import SampleFeatures
from diffsynth_templates.training.objective import TrainingModule


@pytest.fixture(scope="module")
def dit():
    return random_flux2_pipeline().dit


def sample(i: int, edits: int = 0, strength: float = 1.0) -> SampleFeatures:
    g = torch.Generator().manual_seed(i)
    return SampleFeatures(
        id=f"s{i}",
        order=i,
        line=i + 1,
        size=(32, 32),
        latents=torch.randn(128, 2, 2, generator=g),
        prompt_embeds=torch.randn(6, 96, generator=g),
        edit_latents=[torch.randn(128, 2, 2, generator=g) for _ in range(edits)],
        template={"strength": strength},
    )


def test_batched_loss_is_the_mean_of_per_sample_losses(dit):
    torch.manual_seed(0)
    module = TrainingModule(dit, build_architecture("test_everything", {}))
    batch = [sample(0, strength=1.0), sample(1, strength=0.3), sample(2, edits=1)]  # two shape groups
    seeds = [11, 12, 13]
    batched = module(batch, seeds)
    alone = torch.stack([module([s], [seed]) for s, seed in zip(batch, seeds)]).mean()
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-6)


def test_every_trained_cache_key_gets_gradients_and_edit_tokens_matter(dit):
    torch.manual_seed(0)
    template = build_architecture("test_everything", {})
    module = TrainingModule(dit, template)
    module([sample(0), sample(1, strength=0.5)], [1, 2]).backward()
    for name, parameter in template.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in dit.parameters())  # the base model stays frozen
    with torch.no_grad():
        assert module([sample(3, edits=2)], [5]) != module([sample(3, edits=0)], [5])


def test_dit_lora_starts_at_the_base_model_and_trains(dit):
    lora = DiTLoRA(dit, rank=2, targets=["to_q", "attn.to_out"], alpha=4)
    assert "single_transformer_blocks.0.attn.to_out" in lora.module_names
    plain, with_lora = TrainingModule(dit), TrainingModule(dit, dit_lora=lora)
    batch, seeds = [sample(0), sample(1)], [3, 4]
    loss = with_lora(batch, seeds)
    torch.testing.assert_close(loss, plain(batch, seeds))  # B = 0 at the start
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in lora.lora_B.parameters())
    with pytest.raises(ValueError, match="match no Linear"):
        DiTLoRA(dit, rank=2, targets=["nonexistent"])
