"""Z-Image LoRA files against diffusers' ``ZImagePipeline.load_lora_weights`` on the tiny official-layout
folder: the official / ai-toolkit naming (``diffusion_model.``, ``attention.out``, lora_down/up + alpha),
kohya (``lora_unet_layers_0_attention_to_q``) and diffusers / PEFT; and the official fused
``attention.qkv``, which diffusers does not read, against the same LoRA split by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffsynth_templates.pipelines.families.checkpoint_layout import linear_modules
from diffsynth_templates.pipelines.lora import LoRAError
from diffsynth_templates.pipelines.zimage_pipeline import ZImagePipeline
from tests.pipelines.test_zimage_pipeline import run, run_reference

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 4


@pytest.fixture(scope="module")
def pipe(tiny_zimage_root):
    return ZImagePipeline.from_pretrained(tiny_zimage_root, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_zimage_root):
    import diffusers
    import transformers

    root = tiny_zimage_root
    return diffusers.ZImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(root / "vae").eval(),
        text_encoder=transformers.Qwen3ForCausalLM.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        transformer=diffusers.ZImageTransformer2DModel.from_pretrained(root / "transformer").eval(),
    )


def random_lora(dit, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our module path -> (A, B) on the blocks' attention, feed-forward and modulation layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in linear_modules(dit):
        if not name.startswith(("layers.", "noise_refiner.", "context_refiner.")):
            continue
        layer = dit.get_submodule(name)
        out[name] = (
            torch.randn(RANK, layer.in_features, generator=g) * 0.3,
            torch.randn(layer.out_features, RANK, generator=g) * 0.3,
        )
    return out


def as_layout(lora, layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in lora.items():
        if layout == "diffusers":
            out[f"transformer.{name}.lora_A.weight"], out[f"transformer.{name}.lora_B.weight"] = a, b
            continue
        key = (
            "lora_unet_" + name.replace(".", "_")
            if layout == "kohya"
            else "diffusion_model." + name.replace("attention.to_out.0", "attention.out")
        )
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = a, b * 2  # alpha = rank / 2
        out[f"{key}.alpha"] = torch.tensor(RANK / 2)
    return out


@pytest.mark.parametrize("layout", ["official", "kohya", "diffusers"])
def test_zimage_layouts_match_diffusers(pipe, reference, tmp_path, layout):
    path = tmp_path / f"{layout}.safetensors"
    save_file(as_layout(random_lora(pipe.dit), layout), str(path))
    base = run(pipe)
    name = pipe.load_lora(path)
    reference.load_lora_weights(str(path), adapter_name=layout)
    try:
        for scale in (1.0, 0.5):
            pipe.set_lora_scale(name, scale)
            reference.set_adapters([layout], [scale])
            for cfg in (1.0, 4.0):  # diffusers' guidance_scale is ours - 1
                a, b = run(pipe, cfg_scale=cfg), run_reference(reference, cfg - 1)
                assert np.abs(a - b).max() <= 1e-3, (layout, scale, cfg, np.abs(a - b).max())
        assert np.abs(run(pipe) - base).max() > 1e-2
    finally:
        reference.unload_lora_weights()
        pipe.unload_lora()
    assert np.array_equal(run(pipe), base)


def test_fused_official_qkv_equals_the_split_lora(pipe):
    lora = random_lora(pipe.dit, seed=1)
    fused = {}
    for name, (a, b) in lora.items():
        base, _, leaf = name.rpartition(".")
        if leaf in ("to_k", "to_v"):
            continue
        if leaf == "to_q":  # one shared A; the split file gives k and v that same A
            bs = [b, *(lora[f"{base}.{p}"][1] for p in ("to_k", "to_v"))]
            lora[f"{base}.to_k"] = (a, bs[1])
            lora[f"{base}.to_v"] = (a, bs[2])
            fused[f"diffusion_model.{base}.qkv.lora_A.weight"] = a
            fused[f"diffusion_model.{base}.qkv.lora_B.weight"] = torch.cat(bs)
        else:
            fused[f"diffusion_model.{name}.lora_A.weight"], fused[f"diffusion_model.{name}.lora_B.weight"] = (
                a,
                b,
            )
    pipe.load_lora(fused, adapter_name="fused")
    a = run(pipe)
    pipe.unload_lora()
    pipe.load_lora(as_layout(lora, "diffusers"), adapter_name="split")
    b = run(pipe)
    pipe.unload_lora()
    assert np.array_equal(a, b)


def test_flux2_lora_on_zimage_is_named(pipe):
    bad = {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 32),
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 2),
    }
    with pytest.raises(LoRAError, match="this LoRA is for FLUX.2"):
        pipe.load_lora(bad)
