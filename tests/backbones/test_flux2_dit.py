"""Flux2DiT: parity with diffusers, loading of official-layout checkpoints, and the KV-cache laws."""

from __future__ import annotations

import json

import pytest
import torch

from diffsynth_templates import CheckpointError, Flux2DiT, Flux2DiTConfig, KVCacheError
from diffsynth_templates.backbones.attention import apply_rope, rope_cos_sin

TINY = dict(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny diffusers Flux2Transformer2DModel saved sharded in the official layout."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(**TINY).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight non-trivial anyway
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("transformer")
    ref.save_pretrained(folder, max_shard_size="20KB")
    return ref, folder


def make_inputs(batch=2, n_img=12, n_txt=5, seed=0, cfg=TINY):
    g = torch.Generator().manual_seed(seed)
    # image tokens on a grid (t, h, w, l) = (0, row, col, 0), as the pipeline lays them out
    img_ids = torch.zeros(n_img, 4)
    img_ids[:, 1] = torch.arange(n_img) // 4
    img_ids[:, 2] = torch.arange(n_img) % 4
    txt_ids = torch.zeros(n_txt, 4)
    txt_ids[:, 3] = torch.arange(n_txt)
    return dict(
        hidden_states=torch.randn(batch, n_img, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, cfg["joint_attention_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )


def random_kv(model: Flux2DiT, length: int, batch: int = 1, seed: int = 1, names=None):
    g = torch.Generator().manual_seed(seed)
    specs = model.kv_block_specs
    names = names or list(specs)
    return {
        n: (
            torch.randn(batch, length, specs[n].heads, specs[n].head_dim, generator=g),
            torch.randn(batch, length, specs[n].heads, specs[n].head_dim, generator=g),
        )
        for n in names
    }


@pytest.fixture(scope="module")
def model(reference):
    return Flux2DiT.from_pretrained(reference[1])


def test_checkpoint_is_sharded(reference):
    _, folder = reference
    shards = sorted(p.name for p in folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_parity_with_diffusers_fp32(reference, model):
    ref, _ = reference
    inputs = make_inputs()
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        ours = model(**inputs)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 1e-5


def test_parity_with_batched_position_ids(reference, model):
    ref, _ = reference
    inputs = make_inputs(batch=2)
    inputs["img_ids"] = inputs["img_ids"][None].expand(2, -1, -1)
    inputs["txt_ids"] = inputs["txt_ids"][None].expand(2, -1, -1)
    with torch.no_grad():
        expected = ref(**inputs, return_dict=False)[0]
        ours = model(**inputs)
    assert (ours - expected).abs().max().item() <= 1e-5


def test_loads_into_target_dtype_and_runs_bf16(reference):
    model = Flux2DiT.from_pretrained(reference[1], torch_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
    inputs = make_inputs()
    inputs = {k: v.bfloat16() if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**inputs, kv_cache=random_kv(model, 3))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_config_round_trip_and_presets():
    cfg = Flux2DiTConfig.from_diffusers(dict(TINY, _class_name="Flux2Transformer2DModel", patch_size=1))
    assert Flux2DiTConfig.from_diffusers(cfg.to_diffusers()) == cfg
    k4, k9 = Flux2DiTConfig.klein_4b(), Flux2DiTConfig.klein_9b()
    assert (k4.hidden_size, k4.num_heads, k4.num_double_blocks, k4.num_single_blocks, k4.text_dim) == (
        3072,
        24,
        5,
        20,
        7680,
    )
    assert (k9.hidden_size, k9.num_heads, k9.num_double_blocks, k9.num_single_blocks, k9.text_dim) == (
        4096,
        32,
        8,
        24,
        12288,
    )
    with torch.device("meta"):
        big = Flux2DiT(k4)
    n_params = sum(p.numel() for p in big.parameters())
    assert 3.5e9 < n_params < 4.5e9, n_params
    assert len(big.kv_block_specs) == 25


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        Flux2DiTConfig(head_dim=64)
    # a negative size can sum to head_dim; it is refused, while a 0-size (unrotated) axis is allowed
    with pytest.raises(ValueError, match=r"axes_dims_rope \(-32, 96, 32, 32\) must be even, non-negative"):
        Flux2DiTConfig(axes_dims_rope=(-32, 96, 32, 32))
    assert Flux2DiTConfig(axes_dims_rope=(0, 64, 32, 32)).axes_dims_rope == (0, 64, 32, 32)
    with pytest.raises(ValueError, match="num_heads"):
        Flux2DiTConfig(num_heads=0)


# --- loading errors -------------------------------------------------------------------------------


def _copy_folder(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_reported(reference, tmp_path):
    folder = _copy_folder(reference[1], tmp_path / "t")
    shard = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        Flux2DiT.from_pretrained(folder)


def test_missing_shard_is_reported(reference, tmp_path):
    folder = _copy_folder(reference[1], tmp_path / "t")
    shard = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*missing|not in the folder"):
        Flux2DiT.from_pretrained(folder)


def test_wrong_config_gives_mismatched_shapes(reference, tmp_path):
    folder = _copy_folder(reference[1], tmp_path / "t")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["joint_attention_dim"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="context_embedder.weight"):
        Flux2DiT.from_pretrained(folder)


def test_missing_and_unexpected_keys_are_listed(reference, tmp_path):
    folder = _copy_folder(reference[1], tmp_path / "t")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_single_layers"] = 3  # the model now wants single block 2, which the checkpoint lacks
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: single_transformer_blocks\.2\."):
        Flux2DiT.from_pretrained(folder)
    cfg["num_single_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unexpected keys: single_transformer_blocks\.1\."):
        Flux2DiT.from_pretrained(folder)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        Flux2DiT.from_pretrained(tmp_path)


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    again = Flux2DiT.from_pretrained(tmp_path)
    inputs = make_inputs()
    with torch.no_grad():
        assert torch.equal(model(**inputs), again(**inputs))


# --- KV-cache laws --------------------------------------------------------------------------------


def test_empty_cache_changes_nothing(model):
    inputs = make_inputs()
    with torch.no_grad():
        base = model(**inputs)
        empty = model(**inputs, kv_cache=random_kv(model, 0))
    assert torch.equal(base, empty)


def test_cache_changes_output(model):
    inputs = make_inputs()
    with torch.no_grad():
        base = model(**inputs)
        with_kv = model(**inputs, kv_cache=random_kv(model, 4, names=["single_1"]))
    assert (base - with_kv).abs().max() > 1e-3


def _attention_reference(q, k, v):
    """Plain softmax attention over [B, S, H, D], written out by hand."""
    scores = torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v).flatten(2)


def test_block_cache_equals_handwritten_attention(model):
    """single_0 with extra KV equals attention over the concatenated keys/values, computed by hand."""
    block = model.single_transformer_blocks[0].attn
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, model.config.hidden_size, generator=g)
    ids = torch.randint(0, 5, (7, 4)).float()
    rope = rope_cos_sin(ids, model.config.axes_dims_rope, model.config.rope_theta)
    extra = random_kv(model, 5, batch=2, names=["single_0"])["single_0"]

    with torch.no_grad():
        ours = block(x, rope, extra)
        dim = x.shape[-1]
        q, k, v, mlp_in = block.to_qkv_mlp_proj(x).split([dim, dim, dim, 2 * block.mlp_hidden], dim=-1)
        hd = (-1, block.head_dim)
        q = apply_rope(block.norm_q(q.unflatten(-1, hd)), *rope)
        k = apply_rope(block.norm_k(k.unflatten(-1, hd)), *rope)
        attn = _attention_reference(
            q, torch.cat([k, extra[0]], 1), torch.cat([v.unflatten(-1, hd), extra[1]], 1)
        )
        gate, val = mlp_in.chunk(2, -1)
        expected = block.to_out(torch.cat([attn, torch.nn.functional.silu(gate) * val], -1))
    assert (ours - expected).abs().max().item() <= 1e-5


def test_batch1_cache_broadcasts(model):
    inputs = make_inputs(batch=3)
    kv1 = random_kv(model, 4, batch=1)
    kv3 = {n: (k.repeat(3, 1, 1, 1), v.repeat(3, 1, 1, 1)) for n, (k, v) in kv1.items()}
    with torch.no_grad():
        assert (model(**inputs, kv_cache=kv1) - model(**inputs, kv_cache=kv3)).abs().max() <= 1e-6


def test_permuting_extra_tokens_changes_nothing(model):
    inputs = make_inputs()
    kv = random_kv(model, 6)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    permuted = {n: (k[:, perm], v[:, perm]) for n, (k, v) in kv.items()}
    with torch.no_grad():
        assert (model(**inputs, kv_cache=kv) - model(**inputs, kv_cache=permuted)).abs().max() <= 1e-5


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_cache_with_dit_frozen(model, checkpointing):
    model.enable_gradient_checkpointing(checkpointing)
    try:
        inputs = make_inputs()
        kv = {n: (k.requires_grad_(), v.requires_grad_()) for n, (k, v) in random_kv(model, 3).items()}
        model(**inputs, kv_cache=kv).square().mean().backward()
    finally:
        model.enable_gradient_checkpointing(False)
    assert all(p.grad is None for p in model.parameters())
    for name, (k, v) in kv.items():
        assert k.grad is not None and k.grad.abs().sum() > 0, name
        assert v.grad is not None and v.grad.abs().sum() > 0, name


def test_checkpointing_gives_same_gradients(model):
    inputs = make_inputs()
    grads = []
    for flag in (False, True):
        model.enable_gradient_checkpointing(flag)
        kv = {n: (k.requires_grad_(), v.requires_grad_()) for n, (k, v) in random_kv(model, 3).items()}
        model(**inputs, kv_cache=kv).square().mean().backward()
        grads.append(torch.cat([t.grad.flatten() for pair in kv.values() for t in pair]))
    model.enable_gradient_checkpointing(False)
    assert (grads[0] - grads[1]).abs().max() <= 1e-6


# --- KV-cache validation --------------------------------------------------------------------------


def test_unknown_block_name_is_named(model):
    kv = random_kv(model, 2, names=["double_0"])
    kv["double_9"] = kv["double_0"]
    with pytest.raises(KVCacheError, match="double_9"):
        model(**make_inputs(), kv_cache=kv)


def test_wrong_head_dim_is_named(model):
    k = torch.randn(1, 2, model.config.num_heads, model.config.head_dim + 1)
    with pytest.raises(KVCacheError, match=r"single_0.*head_dim|single_0.*expects"):
        model(**make_inputs(), kv_cache={"single_0": (k, k)})


def test_k_v_shape_mismatch_is_named(model):
    k = torch.randn(1, 2, model.config.num_heads, model.config.head_dim)
    v = torch.randn(1, 3, model.config.num_heads, model.config.head_dim)
    with pytest.raises(KVCacheError, match="double_1.*differ"):
        model(**make_inputs(), kv_cache={"double_1": (k, v)})


def test_wrong_cache_batch_is_named(model):
    k = torch.randn(2, 2, model.config.num_heads, model.config.head_dim)
    with pytest.raises(KVCacheError, match="single_1.*batch 2"):
        model(**make_inputs(batch=3), kv_cache={"single_1": (k, k)})


def test_bad_input_shapes_are_named(model):
    inputs = make_inputs()
    inputs["hidden_states"] = inputs["hidden_states"][..., :-1]
    with pytest.raises(ValueError, match="hidden_states"):
        model(**inputs)
    inputs = make_inputs()
    inputs["img_ids"] = inputs["img_ids"][:-1]
    with pytest.raises(ValueError, match="img_ids"):
        model(**inputs)
