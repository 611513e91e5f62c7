"""Gradient checkpointing with runtime LoRA branches (the trained DiT LoRA and a template's LoRA):
the blocks recomputed in backward carry the same branches as in forward, so loss and gradients equal
the run without checkpointing (before the fix, backward raised torch's CheckpointError: the
recomputed blocks saved fewer tensors, their LoRA hooks being gone)."""

from __future__ import annotations

import pytest
import torch

import tests.training.archs  # noqa: F401  (registers test_everything)
from diffsynth_templates.pipelines.random_init import random_flux2_pipeline
from diffsynth_templates.templates import build_architecture
from diffsynth_templates.training.dit_lora import DiTLoRA
from diffsynth_templates.training.objective import TrainingModule
from tests.training.test_objective import sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(checkpointing: bool):
    torch.manual_seed(0)
    dit = random_flux2_pipeline().dit
    template = build_architecture("test_everything", {})  # its cache has a LoRA, KV and extra text
    lora = DiTLoRA(dit, rank=2, targets=["to_q", "attn.to_out"], alpha=4)
    with torch.no_grad():  # B = 0 at the start would leave A without gradient
        for p in lora.lora_B.parameters():
            p.normal_(0, 0.1)
    dit.enable_gradient_checkpointing(checkpointing)
    module = TrainingModule(dit, template, dit_lora=lora, gradient_checkpointing=checkpointing)
    loss = module([sample(0), sample(1, strength=0.5), sample(2, edits=1)], [1, 2, 3])
    loss.backward()
    trained = {f"template.{n}": p.grad for n, p in template.named_parameters()}
    trained |= {f"lora.{n}": p.grad for n, p in lora.named_parameters()}
    assert dit.recompute_context is None  # restored once the step's forward is done
    return loss.detach(), trained


def test_checkpointed_lora_branches_give_the_same_loss_and_gradients():
    loss, grads = _grads(False)
    loss_ckpt, grads_ckpt = _grads(True)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)  # the forward is the same computation
    assert grads.keys() == grads_ckpt.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
