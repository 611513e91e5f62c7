"""torch.compile compatibility of the DiTs: the KV door adds no graph break, and a compiled DiT
(``aot_eager``: graph capture without code generation, so no compiler is needed) computes the same
output as the eager one, with and without a template cache."""

from __future__ import annotations

import pytest
import torch

from diffsynth_templates.pipelines.random_init import random_flux2_pipeline, random_zimage_pipeline

dynamo = pytest.importorskip("torch._dynamo")


def flux2_inputs(dit, kv: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    batch, n, length = 2, 16, 8
    img_ids = torch.stack(
        [torch.zeros(n), torch.arange(n) // 4, torch.arange(n) % 4, torch.zeros(n)], -1
    ).long()
    txt_ids = torch.zeros(length, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(length)
    cache = {
        name: tuple(torch.randn(1, 5, s.heads, s.head_dim, generator=g) for _ in range(2))
        for name, s in dit.kv_block_specs.items()
    }
    return dict(
        hidden_states=torch.randn(batch, n, dit.config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, length, dit.config.text_dim, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids,
        txt_ids=txt_ids,
        kv_cache=cache if kv else None,
    )


def zimage_inputs(dit, kv: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    cache = {
        name: tuple(torch.randn(1, 5, s.heads, s.head_dim, generator=g) for _ in range(2))
        for name, s in dit.kv_block_specs.items()
    }
    return dict(
        x=[torch.randn(dit.config.in_channels, 1, 8, 8, generator=g) for _ in range(2)],
        t=torch.full((2,), 0.5),
        cap_feats=[torch.randn(n, dit.config.cap_feat_dim, generator=g) for n in (7, 12)],  # ragged
        kv_cache=cache if kv else None,
    )


CASES = {"flux2": (random_flux2_pipeline, flux2_inputs), "zimage": (random_zimage_pipeline, zimage_inputs)}


@pytest.mark.parametrize("kv", [False, True])
@pytest.mark.parametrize("backbone", sorted(CASES))
def test_kv_door_adds_no_graph_break(backbone, kv):
    build, make_inputs = CASES[backbone]
    dit = build().dit
    explained = dynamo.explain(dit)(**make_inputs(dit, kv))
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("backbone", sorted(CASES))
def test_compiled_dit_matches_eager(backbone):
    build, make_inputs = CASES[backbone]
    dit = build().dit
    inputs = make_inputs(dit, kv=True)
    dynamo.reset()
    compiled = torch.compile(dit, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        eager, out = dit(**inputs), compiled(**inputs)
    if isinstance(eager, list):
        eager, out = torch.cat([e.flatten() for e in eager]), torch.cat([o.flatten() for o in out])
    assert (eager - out).abs().max() <= 1e-5
