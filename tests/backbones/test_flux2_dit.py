"""Flux2DiT: parity with diffusers, loading of official-layout checkpoints, and its block attention.

The KV-cache laws and validation it shares with Z-Image are in tests/backbones/test_dit_families.py."""

from __future__ import annotations

import json

import pytest
import torch

from diffsynth_templates import CheckpointError, Flux2DiT, Flux2DiTConfig
from diffsynth_templates.backbones.attention import apply_rope, rope_cos_sin
from tests.backbones.dit_cases import FLUX2_TINY, random_kv
from tests.backbones.dit_cases import flux2_inputs as make_inputs

TINY = FLUX2_TINY


@pytest.fixture(scope="module")
def reference(flux2_dit_reference):
    """A tiny diffusers Flux2Transformer2DModel saved sharded in the official layout."""
    return flux2_dit_reference


@pytest.fixture(scope="module")
def model(reference):
    return Flux2DiT.from_pretrained(reference[1])


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


# --- KV-cache laws --------------------------------------------------------------------------------


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


# --- input validation -----------------------------------------------------------------------------


def test_bad_input_shapes_are_named(model):
    inputs = make_inputs()
    inputs["hidden_states"] = inputs["hidden_states"][..., :-1]
    with pytest.raises(ValueError, match="hidden_states"):
        model(**inputs)
    inputs = make_inputs()
    inputs["img_ids"] = inputs["img_ids"][:-1]
    with pytest.raises(ValueError, match="img_ids"):
        model(**inputs)
