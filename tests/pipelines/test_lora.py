"""Runtime LoRA: unfused branches that add B @ A, vanish after the call, and merge by rank."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffsynth_templates.pipelines.lora import LoRAError, applied_lora, merge_loras


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 5, bias=False), nn.Linear(5, 4)])
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.blocks[1](self.blocks[0](x)))


def lora_for(module: str, rank: int, in_f: int, out_f: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {
        f"{module}.lora_A.weight": torch.randn(rank, in_f, generator=g),
        f"{module}.lora_B.weight": torch.randn(out_f, rank, generator=g),
    }


def test_branch_equals_fused_delta_and_is_removed():
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 6)
    lora = lora_for("blocks.0", 2, 6, 5, seed=1)
    base = model(x)
    with applied_lora(model, lora):
        with_lora = model(x)
    fused = Tiny()
    fused.load_state_dict(before)
    with torch.no_grad():
        fused.blocks[0].weight += lora["blocks.0.lora_B.weight"] @ lora["blocks.0.lora_A.weight"]
    assert torch.allclose(with_lora, fused(x), atol=1e-5)
    assert not torch.allclose(with_lora, base)
    assert torch.equal(model(x), base)  # removed after the block
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_repeated_application_never_accumulates():
    model = Tiny()
    x = torch.randn(2, 6)
    lora = lora_for("blocks.1", 3, 5, 4, seed=2)
    outs = []
    for _ in range(10):
        with applied_lora(model, lora):
            outs.append(model(x))
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_merge_concatenates_rank_so_deltas_add():
    a = lora_for("blocks.0", 2, 6, 5, seed=3)
    b = {**lora_for("blocks.0", 1, 6, 5, seed=4), **lora_for("blocks.1", 2, 5, 4, seed=5)}
    merged = merge_loras([a, b])
    assert merged["blocks.0.lora_A.weight"].shape == (3, 6)
    assert merged["blocks.0.lora_B.weight"].shape == (5, 3)
    delta = merged["blocks.0.lora_B.weight"] @ merged["blocks.0.lora_A.weight"]
    expected = a["blocks.0.lora_B.weight"] @ a["blocks.0.lora_A.weight"]
    expected = expected + b["blocks.0.lora_B.weight"] @ b["blocks.0.lora_A.weight"]
    assert torch.allclose(delta, expected, atol=1e-5)
    assert torch.equal(merged["blocks.1.lora_A.weight"], b["blocks.1.lora_A.weight"])


def test_zero_b_changes_nothing():
    model = Tiny()
    x = torch.randn(2, 6)
    lora = lora_for("blocks.0", 2, 6, 5, seed=6)
    lora["blocks.0.lora_B.weight"].zero_()
    base = model(x)
    with applied_lora(model, lora):
        assert torch.equal(model(x), base)


@pytest.mark.parametrize(
    "lora,match",
    [
        (lora_for("blocks.7", 2, 6, 5, 0), "blocks.7.*does not exist"),
        (lora_for("norm", 2, 4, 4, 0), "norm.*not a Linear"),
        (lora_for("blocks.0", 2, 7, 5, 0), "maps 7 -> 5"),
        ({"blocks.0.lora_A.weight": torch.zeros(2, 6)}, "no lora_B"),
        ({"blocks.0.weight": torch.zeros(2, 6)}, "not of the form"),
    ],
)
def test_bad_loras_are_named(lora, match):
    with pytest.raises(LoRAError, match=match):
        with applied_lora(Tiny(), lora, source="my_template"):
            pass
