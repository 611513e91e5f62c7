"""The DiT laws both backbones must keep, one test body each, parametrized over the families (ids
``flux2`` / ``zimage``): sharded official-layout checkpoints, save/load round trips, the KV-cache laws
and the KV-cache validation messages (one shared validator). What only one DiT has (parity with its
diffusers class, its config presets, Z-Image's ragged batches, the hand-written block attention) stays
in tests/backbones/test_{flux2,zimage}_dit.py."""

from __future__ import annotations

import pytest
import torch

from diffsynth_templates import KVCacheError
from diffsynth_templates.pipelines.families import FAMILIES
from tests.backbones.dit_cases import DIT_CASES, DiTCase, as_list, max_diff, random_kv


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def case(request) -> DiTCase:
    return DIT_CASES[request.param]


@pytest.fixture(scope="module")
def reference(request, case):
    return request.getfixturevalue(f"{case.family}_dit_reference")


@pytest.fixture(scope="module")
def model(case, reference):
    dit = case.dit_class.from_pretrained(reference[1])
    assert isinstance(dit, FAMILIES[case.family].dit_class)
    return dit


def _loss(out) -> torch.Tensor:
    return sum(o.square().mean() for o in as_list(out))


def test_checkpoint_is_sharded(reference):
    _, folder = reference
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_save_pretrained_round_trip(case, model, tmp_path):
    model.save_pretrained(tmp_path)
    again = case.dit_class.from_pretrained(tmp_path)
    inputs = case.inputs(2, False)
    with torch.no_grad():
        assert max_diff(model(**inputs), again(**inputs)) == 0.0


# --- KV-cache laws --------------------------------------------------------------------------------


def test_empty_cache_changes_nothing(case, model):
    inputs = case.inputs(2, True)
    with torch.no_grad():
        base = model(**inputs)
        empty = model(**inputs, kv_cache=random_kv(model, 0))
    assert max_diff(base, empty) == 0.0


def test_cache_changes_output(case, model):
    inputs = case.inputs(2, False)
    with torch.no_grad():
        base = model(**inputs)
        with_kv = model(**inputs, kv_cache=random_kv(model, 4, names=[case.other_block]))
    assert max_diff(base, with_kv) > 1e-3


def test_batch1_cache_broadcasts(case, model):
    inputs = case.inputs(3, True)
    kv1 = random_kv(model, 4, batch=1)
    kv3 = {n: (k.repeat(3, 1, 1, 1), v.repeat(3, 1, 1, 1)) for n, (k, v) in kv1.items()}
    with torch.no_grad():
        assert max_diff(model(**inputs, kv_cache=kv1), model(**inputs, kv_cache=kv3)) <= 1e-6


def test_permuting_extra_tokens_changes_nothing(case, model):
    inputs = case.inputs(2, True)
    kv = random_kv(model, 6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    permuted = {n: (k[:, perm], v[:, perm]) for n, (k, v) in kv.items()}
    with torch.no_grad():
        assert max_diff(model(**inputs, kv_cache=kv), model(**inputs, kv_cache=permuted)) <= 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_cache_with_dit_frozen(case, model, checkpointing):
    model.enable_gradient_checkpointing(checkpointing)
    try:
        kv = {n: (k.requires_grad_(), v.requires_grad_()) for n, (k, v) in random_kv(model, 3).items()}
        _loss(model(**case.inputs(2, True), kv_cache=kv)).backward()
    finally:
        model.enable_gradient_checkpointing(False)
    assert all(p.grad is None for p in model.parameters())
    for name, (k, v) in kv.items():
        assert k.grad is not None and k.grad.abs().sum() > 0, name
        assert v.grad is not None and v.grad.abs().sum() > 0, name


def test_checkpointing_gives_same_gradients(case, model):
    inputs = case.inputs(2, True)
    grads = []
    try:
        for flag in (False, True):
            model.enable_gradient_checkpointing(flag)
            kv = {n: (k.requires_grad_(), v.requires_grad_()) for n, (k, v) in random_kv(model, 3).items()}
            _loss(model(**inputs, kv_cache=kv)).backward()
            grads.append(torch.cat([t.grad.flatten() for pair in kv.values() for t in pair]))
    finally:
        model.enable_gradient_checkpointing(False)
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


# --- KV-cache validation (one shared validator, the same messages on both) ------------------------


def test_unknown_block_name_is_named(case, model):
    kv = random_kv(model, 2, names=[case.first_block])
    kv[case.unknown_block] = kv[case.first_block]
    with pytest.raises(KVCacheError, match=f"unknown block name '{case.unknown_block}'"):
        model(**case.inputs(2, False), kv_cache=kv)


def test_wrong_head_dim_is_named(case, model):
    heads, head_dim = model.config.num_heads, model.config.head_dim
    k = torch.randn(1, 2, heads, head_dim + 1)
    for block in model.kv_block_specs:
        with pytest.raises(KVCacheError, match=rf"{block}.*expects {heads} x {head_dim}"):
            model(**case.inputs(2, False), kv_cache={block: (k, k)})


def test_k_v_shape_mismatch_is_named(case, model):
    k = torch.randn(1, 2, model.config.num_heads, model.config.head_dim)
    v = torch.randn(1, 3, model.config.num_heads, model.config.head_dim)
    for block in model.kv_block_specs:
        with pytest.raises(KVCacheError, match=f"{block}.*differ"):
            model(**case.inputs(2, False), kv_cache={block: (k, v)})


def test_wrong_cache_batch_is_named(case, model):
    k = torch.randn(2, 2, model.config.num_heads, model.config.head_dim)
    for block in model.kv_block_specs:
        with pytest.raises(KVCacheError, match=f"{block}.*batch 2"):
            model(**case.inputs(3, False), kv_cache={block: (k, k)})
