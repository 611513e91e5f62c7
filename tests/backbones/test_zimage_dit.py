"""ZImageDiT: parity with diffusers' ZImageTransformer2DModel, official-layout loading, ragged batches and
its block attention.

The KV-cache laws and validation it shares with FLUX.2 are in tests/backbones/test_dit_families.py."""

from __future__ import annotations

import json

import pytest
import torch

from diffsynth_templates.backbones.attention import apply_rope
from diffsynth_templates.backbones.zimage_dit import ZImageDiT, ZImageDiTConfig, rope_tables
from tests.backbones.dit_cases import ZIMAGE_TINY, max_diff, random_kv
from tests.backbones.dit_cases import zimage_inputs as make_inputs

TINY = ZIMAGE_TINY
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(zimage_dit_reference):
    """A tiny diffusers ZImageTransformer2DModel, every weight randomized, saved sharded in the official layout."""
    return zimage_dit_reference


def clone(inputs):
    return {k: [v.clone() for v in vs] if isinstance(vs, list) else vs.clone() for k, vs in inputs.items()}


@pytest.fixture(scope="module")
def model(reference):
    return ZImageDiT.from_pretrained(reference[1])


@pytest.mark.parametrize(
    "caption_lengths, sizes",
    [
        ((7, 7), ((8, 8), (8, 8))),  # equal lengths: no attention mask
        ((7, 40), ((8, 8), (8, 8))),  # captions of different padded lengths: masked
        ((40, 3), ((8, 8), (6, 12))),  # and images of different sizes
    ],
)
def test_parity_with_diffusers_fp32(reference, model, caption_lengths, sizes):
    ref, _ = reference
    inputs = make_inputs(caption_lengths, sizes)
    with torch.no_grad():
        expected = ref(**clone(inputs), return_dict=False)[0]
        ours = model(**inputs)
    assert max_diff(ours, expected) <= TOL
    assert expected[0].abs().mean() > 0.1  # a real signal, not zeros


def test_ragged_batch_equals_each_sample_alone(model):
    """Padding rows and the mask never leak into a sample, with template tokens present too."""
    inputs = make_inputs((7, 40))
    kv = random_kv(model, 3)
    with torch.no_grad():
        batched = model(**inputs, kv_cache=kv)
        for i in range(2):
            alone = model(
                x=[inputs["x"][i]], t=inputs["t"][i : i + 1], cap_feats=[inputs["cap_feats"][i]], kv_cache=kv
            )
            assert max_diff([batched[i]], alone) <= TOL


def test_loads_into_target_dtype_and_matches_diffusers_bf16(reference):
    from diffusers import ZImageTransformer2DModel

    model = ZImageDiT.from_pretrained(reference[1], torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    ref = ZImageTransformer2DModel.from_pretrained(reference[1], torch_dtype=torch.bfloat16).eval()
    inputs = make_inputs((7, 40), dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ref(**clone(inputs), return_dict=False)[0]
        ours = model(**inputs)
        fp32 = reference[0](**make_inputs((7, 40)), return_dict=False)[0]
    assert all(o.dtype == torch.bfloat16 for o in ours)
    # the same bf16 rounding as the reference (bit-identical on CPU), far below bf16's own error
    assert max_diff(ours, expected) <= 0.1 * max_diff(expected, fp32)
    with torch.no_grad():
        out = model(**inputs, kv_cache=random_kv(model, 3))
    assert all(torch.isfinite(o.float()).all() for o in out)


def test_config_round_trip_and_official_preset(reference):
    raw = json.loads((reference[1] / "config.json").read_text())
    cfg = ZImageDiTConfig.from_diffusers(raw)
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (64, 2, 2, 32)
    assert ZImageDiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    official = ZImageDiTConfig.official()
    assert (official.dim, official.num_heads, official.head_dim) == (3840, 30, 128)
    assert (official.num_layers, official.num_refiner_layers, official.cap_feat_dim) == (30, 2, 2560)
    assert official.axes_dims == (32, 48, 48) and official.axes_lens == (1536, 512, 512)
    with torch.device("meta"):
        big = ZImageDiT(official)
    n_params = sum(p.numel() for p in big.parameters())
    assert 6.0e9 < n_params < 6.3e9, n_params
    assert list(big.kv_block_specs) == [f"block_{i}" for i in range(30)]


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="axes_dims"):
        ZImageDiTConfig(axes_dims=(32, 48, 40))
    with pytest.raises(ValueError, match="non-negative"):
        ZImageDiTConfig(axes_dims=(-16, 72, 72))
    with pytest.raises(ValueError, match="Omni"):
        ZImageDiTConfig.from_diffusers(dict(TINY, siglip_feat_dim=1152))


def test_bad_inputs_are_named(model):
    inputs = make_inputs()
    inputs["x"][1] = inputs["x"][1][:, :, :7]
    with pytest.raises(ValueError, match=r"x\[1\]"):
        model(**inputs)
    inputs = make_inputs()
    inputs["cap_feats"][0] = inputs["cap_feats"][0][:, :-1]
    with pytest.raises(ValueError, match=r"cap_feats\[0\]"):
        model(**inputs)
    with pytest.raises(ValueError, match="axes_lens"):  # 300 caption slots do not fit 256 positions
        model(**make_inputs((300, 7)))
    with pytest.raises(ValueError, match="Omni"):
        model(x=[[torch.zeros(16, 1, 8, 8)]], t=torch.zeros(1), cap_feats=[[torch.zeros(3, 24)]])


# --- KV-cache laws --------------------------------------------------------------------------------


def _attention_reference(q, k, v, key_mask):
    """Plain softmax attention over [B, S, H, D] with masked keys, written out by hand."""
    scores = torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).flatten(2)


def test_block_cache_equals_handwritten_attention(model):
    """block_0 attention with extra KV and a padding mask equals attention over the concatenated
    keys/values computed by hand: padding keys hidden, template tokens always visible, no norm or
    rotation on them."""
    attn = model.layers[0].attention
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, model.config.dim, generator=g)
    rope = rope_tables(torch.randint(0, 9, (7, 3)), model.config.axes_dims, model.config.rope_theta)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    extra = random_kv(model, 5, batch=2, names=["block_0"])["block_0"]

    with torch.no_grad():
        ours = attn(x, rope, mask, extra)
        heads = (-1, attn.head_dim)
        q = apply_rope(attn.norm_q(attn.to_q(x).unflatten(-1, heads)), *rope)
        k = apply_rope(attn.norm_k(attn.to_k(x).unflatten(-1, heads)), *rope)
        v = attn.to_v(x).unflatten(-1, heads)
        keys_visible = torch.cat([mask, torch.ones(2, 5, dtype=torch.bool)], dim=1)
        out = _attention_reference(q, torch.cat([k, extra[0]], 1), torch.cat([v, extra[1]], 1), keys_visible)
        expected = attn.to_out[0](out)
    assert (ours - expected).abs().max().item() <= TOL
