"""Qwen3TextEncoder against transformers' Qwen3ForCausalLM (the test-only reference), on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffsynth_templates.backbones.qwen3 import Qwen3Config, Qwen3TextEncoder
from diffsynth_templates.loading import CheckpointError

transformers = pytest.importorskip("transformers")

LAYERS = (0, 9, 18, 27, 28)  # embeddings, the three FLUX.2-klein layers, the final (normed) output
TOL = 1e-5


def tiny_hf_qwen3(vocab_size: int = 300, tie_word_embeddings: bool = True, seed: int = 0):
    """A 28-layer Qwen3ForCausalLM (so layers 9/18/27 exist), 32 wide, with every weight randomized.

    Norm weights are moved away from 1 and linear weights scaled up so a wrong norm, head order or
    rotation shows up in the outputs instead of vanishing in tiny activations.
    """
    config = transformers.Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=28,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def reference_states(model, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        ).hidden_states


def max_diff(ours, ref, layers=LAYERS) -> float:
    return max((o - ref[i]).abs().max().item() for o, i in zip(ours, layers))


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_qwen3()


@pytest.fixture(scope="module")
def sharded_folder(hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_sharded")
    hf_model.save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    return folder


@pytest.fixture(scope="module")
def single_folder(hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3_single")
    hf_model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def batch(padding: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (3, 40), generator=gen)
    if padding == "none":
        return input_ids, None
    mask = torch.ones(3, 40, dtype=torch.long)
    if padding == "right":  # what the FLUX.2 prompt encoder produces
        mask[1, 23:] = 0
        mask[2, 7:] = 0
    else:
        mask[1, :17] = 0
    return input_ids, mask


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_sharded_checkpoint_matches_transformers(hf_model, sharded_folder, padding):
    ours = Qwen3TextEncoder.from_pretrained(sharded_folder)
    input_ids, mask = batch(padding)
    got = ours(input_ids, mask, output_hidden_states_layers=LAYERS)
    ref = reference_states(hf_model, input_ids, mask)
    # every position, pads included: the DiT receives the pad tokens' states too
    assert max_diff(got, ref) <= TOL


def test_single_file_checkpoint_matches_transformers(hf_model, single_folder):
    ours = Qwen3TextEncoder.from_pretrained(single_folder)
    input_ids, mask = batch("right")
    got = ours(input_ids, mask, output_hidden_states_layers=LAYERS)
    assert max_diff(got, reference_states(hf_model, input_ids, mask)) <= TOL


def test_bfloat16_matches_transformers(single_folder):
    ref_model = transformers.Qwen3ForCausalLM.from_pretrained(single_folder, dtype=torch.bfloat16).eval()
    ours = Qwen3TextEncoder.from_pretrained(single_folder, torch_dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    input_ids, mask = batch("right")
    got = ours(input_ids, mask, output_hidden_states_layers=LAYERS)
    ref = reference_states(ref_model, input_ids, mask)
    for o, i in zip(got, LAYERS):
        torch.testing.assert_close(o, ref[i])


def test_lm_head_in_checkpoint_is_ignored(tmp_path):
    hf = tiny_hf_qwen3(tie_word_embeddings=False, seed=3)  # like the 9B encoder: an untied head is saved
    hf.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in f.keys()
    ours = Qwen3TextEncoder.from_pretrained(tmp_path)
    assert not any(k.startswith("lm_head") for k in ours.state_dict())
    assert not hasattr(ours, "lm_head")
    input_ids, mask = batch("right")
    got = ours(input_ids, mask, output_hidden_states_layers=LAYERS)
    assert max_diff(got, reference_states(hf, input_ids, mask)) <= TOL


def test_missing_key_raises_naming_it(hf_model, tmp_path):
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if not k.startswith("lm_head")}
    del state["model.layers.3.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_model.config.to_dict()))
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        Qwen3TextEncoder.from_pretrained(tmp_path)


def test_only_layers_up_to_the_largest_requested_index_run(single_folder):
    ours = Qwen3TextEncoder.from_pretrained(single_folder)
    calls: list[int] = []
    for i, layer in enumerate(ours.model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    ours(torch.zeros(1, 5, dtype=torch.long), output_hidden_states_layers=(18, 9))
    assert calls == list(range(18))
    calls.clear()
    ours(torch.zeros(1, 5, dtype=torch.long), output_hidden_states_layers=(0,))
    assert calls == []


def test_indices_follow_request_order_and_allow_negative(single_folder):
    ours = Qwen3TextEncoder.from_pretrained(single_folder)
    input_ids = torch.arange(12)[None]
    last, first = ours(input_ids, output_hidden_states_layers=(-1, 0))
    ref_last, ref_first = ours(input_ids, output_hidden_states_layers=(28, 0))
    assert torch.equal(last, ref_last) and torch.equal(first, ref_first)
    assert torch.equal(first, ours.model.embed_tokens(input_ids))


@pytest.mark.parametrize("bad", [(29,), (-30,), (), (1.5,)])
def test_out_of_range_index_raises(single_folder, bad):
    ours = Qwen3TextEncoder.from_pretrained(single_folder)
    with pytest.raises(ValueError, match="hidden-state index|non-empty"):
        ours(torch.zeros(1, 3, dtype=torch.long), output_hidden_states_layers=bad)


def test_mismatched_mask_raises(single_folder):
    ours = Qwen3TextEncoder.from_pretrained(single_folder)
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4), output_hidden_states_layers=(1,))


def test_save_pretrained_loads_in_transformers(hf_model, single_folder, tmp_path):
    ours = Qwen3TextEncoder.from_pretrained(single_folder)
    ours.save_pretrained(tmp_path)
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    input_ids, mask = batch("right")
    assert max_diff(ours(input_ids, mask, LAYERS), reference_states(reloaded, input_ids, mask)) <= TOL
    assert Qwen3Config.from_dict(json.loads((tmp_path / "config.json").read_text())) == ours.config


# --- config ----------------------------------------------------------------------------------------


def test_config_reads_transformers5_and_flat_rope_theta(hf_model):
    d = hf_model.config.to_dict()
    assert "rope_parameters" in d  # transformers 5 layout
    cfg = Qwen3Config.from_dict(d)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (32, 28, 2, 8)
    assert cfg.rope_theta == 1_000_000.0 and cfg.max_position_embeddings == 1024

    flat = {k: v for k, v in d.items() if k != "rope_parameters"} | {"rope_theta": 5000.0}
    assert Qwen3Config.from_dict(flat).rope_theta == 5000.0


def test_config_derives_missing_head_dim():
    cfg = Qwen3Config.from_dict({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2})
    assert cfg.head_dim == 16


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"rms_norm_eps": -1.0}, "-1.0"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "yarn"),
        ({"model_type": "llama"}, "llama"),
        ({"use_sliding_window": True}, "sliding"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_config_rejects_bad_values_naming_them(hf_model, change, needle):
    with pytest.raises(ValueError, match=needle):
        Qwen3Config.from_dict(hf_model.config.to_dict() | change)
