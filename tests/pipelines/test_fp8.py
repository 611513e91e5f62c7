"""FP8 weight storage (loading/quantize.py, ``pipe.enable_layerwise_casting``,
``from_pretrained(weight_dtype=...)``): the bytes it saves at full FLUX.2-klein size, the toy base model's
images against full precision (the issue's acceptance: mean PSNR >= 38 dB over 8 prompts, 20 steps),
runtime LoRA branches and template KV on FP8 layers, and every refusal."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from diffsynth_templates.backbones.flux2_dit import Flux2DiT, Flux2DiTConfig
from diffsynth_templates.loading.quantize import (
    FP8Linear,
    QuantizationError,
    fp8_quantize,
    module_weight_bytes,
    store_weights,
)
from diffsynth_templates.pipelines.auto import load_pipeline
from diffsynth_templates.pipelines.lora import applied_lora
from diffsynth_templates.toy import world as toy_world
from diffsynth_templates.toy.metrics import psnr

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TOY = "models/toy/base"


def toy_images(pipe, n: int = 8, steps: int = 20, **kw) -> list[np.ndarray]:
    prompts = [p for p, _ in toy_world.fixed_eval_prompts(n)]
    size = toy_world.TOY_SIZE
    args = dict(height=size, width=size, num_inference_steps=steps, cfg_scale=1.0, max_sequence_length=40)
    return [
        np.asarray(pipe(prompt=[p], seed=i, progress=False, **args, **kw)[0]) for i, p in enumerate(prompts)
    ]


@pytest.mark.parametrize("preset", ["klein_4b", "klein_9b"])
def test_full_size_klein_dit_weights_take_at_most_055x_their_bf16_bytes(preset):
    """Exact accounting at full width, on the meta device: no memory is allocated."""
    with torch.device("meta"):
        dit = Flux2DiT(getattr(Flux2DiTConfig, preset)()).to(torch.bfloat16)
    bf16 = module_weight_bytes(dit)
    report = store_weights(dit, torch.float8_e4m3fn)
    assert report.bytes_before == bf16 and report.bytes_after == module_weight_bytes(dit)
    assert report.bytes_after <= 0.55 * bf16, report
    # the embedders, the output head and the norms' linears stay in the compute dtype
    assert dit.proj_out.weight.dtype == torch.bfloat16 and dit.x_embedder.weight.dtype == torch.bfloat16
    assert dit.single_transformer_blocks[0].attn.to_out.weight.dtype == torch.float8_e4m3fn


def test_toy_images_with_fp8_storage_are_within_38_db_of_full_precision():
    reference = toy_images(load_pipeline(TOY, device="cpu"))
    pipe = load_pipeline(TOY, device="cpu", weight_dtype=torch.float8_e4m3fn)
    assert isinstance(pipe.dit.transformer_blocks[0].attn.to_q, FP8Linear)
    assert module_weight_bytes(pipe.dit) < 0.3 * module_weight_bytes(load_pipeline(TOY, device="cpu").dit)
    values = [psnr(a, b) for a, b in zip(reference, toy_images(pipe))]
    assert np.mean(values) >= 38.0, values


def test_from_pretrained_weight_dtype_equals_casting_after_loading():
    loaded = load_pipeline(TOY, device="cpu", weight_dtype="float8_e4m3fn")
    cast = load_pipeline(TOY, device="cpu").enable_layerwise_casting(torch.float8_e4m3fn)
    for (name, a), (_, b) in zip(loaded.dit.state_dict().items(), cast.dit.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a.float(), b.float()), name
    assert cast.storage_reports["dit"].layers > 0 and cast.storage_reports["text_encoder"].layers > 0
    assert np.array_equal(toy_images(loaded, 1, 4), toy_images(cast, 1, 4))


def test_fp8_linear_is_a_linear_and_runtime_lora_branches_still_apply():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.Linear(80, 64))
    x = torch.randn(3, 96)
    store_weights(model, torch.float8_e4m3fn, skip=())
    layer = model[1]
    assert isinstance(layer, nn.Linear) and type(layer) is FP8Linear
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (64, 1)
    assert layer.in_features == 80 and layer.out_features == 64
    base = model(x)
    lora = {"1.lora_A.weight": torch.randn(4, 80), "1.lora_B.weight": torch.randn(64, 4)}
    with applied_lora(model, lora):
        with_lora = model(x)
    expected = base + model[0](x) @ lora["1.lora_A.weight"].T @ lora["1.lora_B.weight"].T
    assert torch.allclose(with_lora, expected, atol=1e-4)
    assert torch.equal(model(x), base)  # the branch is gone after the context


def test_fp8_quantization_keeps_each_channels_range():
    w = torch.randn(16, 64) * torch.logspace(-3, 2, 16)[:, None]  # channels five decades apart
    for per_channel, bound in ((True, 0.07), (False, None)):
        q, scale = fp8_quantize(w, "float8_e4m3fn", per_channel)
        error = ((q.float() * scale - w).abs().amax(1) / w.abs().amax(1)).max()
        if bound is not None:  # e4m3 keeps 3 mantissa bits: a relative error of at most 1/16 per value
            assert error <= bound
    assert q.abs().float().max() <= 448  # per tensor: the small channels lose their low bits


def test_template_kv_and_gradients_flow_through_an_fp8_dit(pipes):
    pipe = pipes["flux2"]
    spec = pipe.dit.kv_block_specs["single_0"]
    dit = Flux2DiT(pipe.dit.config)
    dit.load_state_dict(pipe.dit.state_dict())
    dit.requires_grad_(False)
    store_weights(dit, torch.float8_e4m3fn, min_elements=1)
    k = torch.randn(1, 3, spec.heads, spec.head_dim, requires_grad=True)
    cfg = dit.config
    out = dit(
        torch.randn(1, 4, cfg.in_channels), torch.randn(1, 2, cfg.text_dim), torch.tensor([0.5]),
        torch.zeros(4, 4), torch.zeros(2, 4), kv_cache={"single_0": (k, k * 0.5)},
    )  # fmt: skip
    out.square().mean().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0  # a template trains through the frozen FP8 DiT
    assert all(p.grad is None for p in dit.parameters())


def test_bf16_compute_on_a_float32_pipeline_casts_everything_but_the_fp8_weights():
    pipe = load_pipeline(TOY, device="cpu").enable_layerwise_casting(torch.float8_e4m3fn, torch.bfloat16)
    assert pipe.torch_dtype == torch.bfloat16
    assert pipe.dit.proj_out.weight.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.dit.transformer_blocks[0].attn.to_q.weight_scale.dtype == torch.float32
    assert toy_images(pipe, 1, 3)[0].std() > 5  # an image, not a flat field


def test_refusals_name_what_to_do(monkeypatch):
    pipe = load_pipeline(TOY, device="cpu")
    with pytest.raises(QuantizationError, match="float8_e4m3fn"):
        pipe.enable_layerwise_casting(torch.float16)
    with pytest.raises(QuantizationError, match="compute_dtype must be"):
        pipe.enable_layerwise_casting(torch.float8_e4m3fn, compute_dtype=torch.float8_e4m3fn)
    with pytest.raises(QuantizationError, match="choose among"):
        pipe.enable_layerwise_casting(torch.float8_e4m3fn, components=["vae"])
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    for fmt in ("int8", "nf4"):
        with pytest.raises(QuantizationError, match=r"needs torchao: pip install"):
            store_weights(nn.Linear(128, 128), fmt, min_elements=1)
    monkeypatch.delattr(torch, "float8_e4m3fn")  # a torch without float8 dtypes
    with pytest.raises(QuantizationError, match="no torch.float8_e4m3fn.*upgrade torch"):
        store_weights(nn.Linear(128, 128), "float8_e4m3fn")
    assert isinstance(pipe.dit.transformer_blocks[0].attn.to_q, nn.Linear)


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_torchao_weight_only_formats_when_installed(fmt):
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 64))
    x = torch.randn(4, 256)
    reference = model(x)
    report = store_weights(model, fmt, skip=(), min_elements=1)
    assert report.layers == 2 and report.bytes_after < 0.4 * report.bytes_before
    assert isinstance(model[0], nn.Linear)
    error = (model(x) - reference).abs().mean() / reference.abs().mean()
    assert error < (0.02 if fmt == "int8" else 0.2)


def test_fusing_a_lora_into_fp8_or_streamed_weights_is_refused():
    from diffsynth_templates.pipelines.offload import OffloadError

    pipe = load_pipeline(TOY, device="cpu")
    pipe.fuse_lora()  # nothing loaded: nothing to fuse, no error
    pipe.enable_block_offload(vram_limit_gb=1.0)
    with pytest.raises(OffloadError, match="before enable_block_offload"):
        pipe.fuse_lora()
    pipe.disable_block_offload().enable_layerwise_casting(torch.float8_e4m3fn)
    for what in (pipe.fuse_lora, pipe.unfuse_lora):
        with pytest.raises(QuantizationError, match="runtime branches"):
            what()
