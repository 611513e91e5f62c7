"""ZImageDiT: parity with diffusers' ZImageTransformer2DModel, official-layout loading, and the KV-cache laws."""

from __future__ import annotations

import json

import pytest
import torch

from diffsynth_templates import KVCacheError
from diffsynth_templates.backbones.attention import apply_rope
from diffsynth_templates.backbones.zimage_dit import ZImageDiT, ZImageDiTConfig, rope_tables

TINY = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=24,
    rope_theta=256.0,
    axes_dims=[8, 12, 12],
    axes_lens=[256, 64, 64],
)
TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny diffusers ZImageTransformer2DModel, every weight randomized, saved sharded in the official layout."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**TINY).eval()
    with torch.no_grad():  # pad tokens and norms start at 0 / 1: move them so a wrong use shows
        for name, p in ref.named_parameters():
            if "norm" in name or name == "cap_embedder.0.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("transformer")
    ref.save_pretrained(folder, max_shard_size="30KB")
    return ref, folder


@pytest.fixture(scope="module")
def model(reference):
    return ZImageDiT.from_pretrained(reference[1])


def make_inputs(caption_lengths=(7, 7), sizes=((8, 8), (8, 8)), seed=0, dtype=torch.float32):
    """Latents ``[16, 1, H, W]`` and caption features per sample; 8x8 latents are 16 tokens, so both
    segments get learned pad tokens (to 32); caption lengths 7 and 40 pad to 32 and 64 (a ragged batch)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=[torch.randn(16, 1, h, w, generator=g).to(dtype) for h, w in sizes],
        t=torch.rand(len(sizes), generator=g),
        cap_feats=[torch.randn(n, TINY["cap_feat_dim"], generator=g).to(dtype) for n in caption_lengths],
    )


def clone(inputs):
    return {k: [v.clone() for v in vs] if isinstance(vs, list) else vs.clone() for k, vs in inputs.items()}


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def random_kv(model: ZImageDiT, length: int, batch: int = 1, seed: int = 1, names=None):
    g = torch.Generator().manual_seed(seed)
    specs = model.kv_block_specs
    return {
        n: tuple(torch.randn(batch, length, specs[n].heads, specs[n].head_dim, generator=g) for _ in range(2))
        for n in names or list(specs)
    }


def test_checkpoint_is_sharded(reference):
    _, folder = reference
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()


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


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = ZImageDiT.from_pretrained(tmp_path)
    inputs = make_inputs()
    with torch.no_grad():
        assert max_diff(model(**inputs), again(**inputs)) == 0.0


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


def test_empty_cache_changes_nothing(model):
    inputs = make_inputs((7, 40))
    with torch.no_grad():
        base = model(**inputs)
        empty = model(**inputs, kv_cache=random_kv(model, 0))
    assert max_diff(base, empty) == 0.0


def test_cache_changes_output(model):
    inputs = make_inputs()
    with torch.no_grad():
        base = model(**inputs)
        with_kv = model(**inputs, kv_cache=random_kv(model, 4, names=["block_1"]))
    assert max_diff(base, with_kv) > 1e-3


def test_batch1_cache_broadcasts(model):
    inputs = make_inputs((7, 40, 12), ((8, 8),) * 3)
    kv1 = random_kv(model, 4, batch=1)
    kv3 = {n: (k.repeat(3, 1, 1, 1), v.repeat(3, 1, 1, 1)) for n, (k, v) in kv1.items()}
    with torch.no_grad():
        assert max_diff(model(**inputs, kv_cache=kv1), model(**inputs, kv_cache=kv3)) <= 1e-6


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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_cache_with_dit_frozen(model, checkpointing):
    model.enable_gradient_checkpointing(checkpointing)
    try:
        kv = {n: (k.requires_grad_(), v.requires_grad_()) for n, (k, v) in random_kv(model, 3).items()}
        out = model(**make_inputs((7, 40)), kv_cache=kv)
        sum(o.square().mean() for o in out).backward()
    finally:
        model.enable_gradient_checkpointing(False)
    assert all(p.grad is None for p in model.parameters())
    for name, (k, v) in kv.items():
        assert k.grad is not None and k.grad.abs().sum() > 0, name
        assert v.grad is not None and v.grad.abs().sum() > 0, name


# --- KV-cache validation (the same messages as FLUX.2: one shared validator) -----------------------


def test_unknown_block_name_is_named(model):
    kv = random_kv(model, 2, names=["block_0"])
    kv["noise_refiner_0"] = kv["block_0"]  # refiners take no template tokens
    with pytest.raises(KVCacheError, match="unknown block name 'noise_refiner_0'"):
        model(**make_inputs(), kv_cache=kv)


def test_wrong_head_dim_is_named(model):
    k = torch.randn(1, 2, model.config.num_heads, model.config.head_dim + 1)
    with pytest.raises(KVCacheError, match=r"block_1.*expects 2 x 32"):
        model(**make_inputs(), kv_cache={"block_1": (k, k)})


def test_wrong_cache_batch_is_named(model):
    k = torch.randn(2, 2, model.config.num_heads, model.config.head_dim)
    with pytest.raises(KVCacheError, match="block_0.*batch 2"):
        model(**make_inputs((7, 7, 7), ((8, 8),) * 3), kv_cache={"block_0": (k, k)})
