"""Our LoRAs written for other tools: a trained ``dit_lora`` (``--lora_export_format``) and a
``lora_bank`` template's output, in the ComfyUI (BFL) and diffusers layouts, loaded by diffusers'
``load_lora_weights``; its image must match ours within 1e-3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffsynth_templates.pipelines.lora import LoRAError
from diffsynth_templates.templates.zoo.lora_bank import LoRABank, LoRABankConfig
from diffsynth_templates.training.config import DEFAULT_LORA_TARGETS
from diffsynth_templates.training.dit_lora import DiTLoRA, export_dit_lora
from tests.pipelines.test_lora_files import ours, theirs

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_dit_lora(dit) -> dict[str, torch.Tensor]:
    """A DiT LoRA as train.py saves it (default targets, alpha != rank), B no longer zero."""
    lora = DiTLoRA(dit, rank=4, targets=DEFAULT_LORA_TARGETS.split(","), alpha=2.0, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return {k: v.detach() for k, v in lora.cache().items()}


def lora_bank_output(pipe) -> dict[str, torch.Tensor]:
    config = LoRABankConfig.for_dit(pipe.dit.config, rank=3, num_loras=2)
    bank = LoRABank(config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    features = bank.process_inputs(pipe=pipe, lora_ids=[0, 1], lora_scales=[0.7, -0.4])
    return {k: v.detach() for k, v in bank(pipe=pipe, **features)["lora"].items()}


def ours_with(pipe, lora, cfg):
    return pipe(
        prompt="a photo of a cat sitting on a windowsill", height=64, width=64, num_inference_steps=3,
        latents=torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(0)), output_type="np",
        cfg_scale=cfg, max_sequence_length=32, progress=False, lora=lora, negative_lora=lora if cfg != 1 else None,
    )  # fmt: skip


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
@pytest.mark.parametrize("source", ["dit_lora", "lora_bank"])
def test_exported_lora_loads_in_diffusers(pipe, reference, tmp_path, fmt, source):
    if source == "dit_lora":
        lora = trained_dit_lora(pipe.dit)
        path = export_dit_lora(lora, pipe.dit.config.to_diffusers(), fmt, tmp_path)
        assert path.name == f"dit_lora_{fmt}.safetensors"
    else:
        lora = lora_bank_output(pipe)
        path = pipe.save_lora(lora, tmp_path / "bank.safetensors", fmt)
    keys = list(load_file(str(path)))
    prefix = "diffusion_model.double_blocks." if fmt == "comfyui" else "transformer.transformer_blocks."
    assert any(k.startswith(prefix) for k in keys)
    reference.load_lora_weights(str(path), adapter_name="ours")
    try:
        for cfg in (1.0, 4.0):
            a, b = ours_with(pipe, lora, cfg), theirs(reference, cfg)
            assert np.abs(a - b).max() <= 1e-3, (cfg, np.abs(a - b).max())
            assert np.abs(a - ours(pipe, cfg)).max() > 1e-2
    finally:
        reference.unload_lora_weights()
    # and our own loader reads the export back to the same image
    expected = ours_with(pipe, lora, 1.0)
    pipe.load_lora(path, adapter_name="back")
    try:
        assert np.abs(ours(pipe, 1.0) - expected).max() <= 1e-4
    finally:
        pipe.unload_lora()


def test_fused_qkv_export_keeps_separate_projection_loras_apart(pipe):
    """q and k with different A (and v without a LoRA): the fused qkv LoRA is block-diagonal, so each
    projection gets exactly its own delta back."""
    dit = pipe.dit
    g = torch.Generator().manual_seed(3)
    lora = {}
    for name, rank in (("transformer_blocks.0.attn.to_q", 2), ("transformer_blocks.0.attn.to_k", 3)):
        layer = dit.get_submodule(name)
        lora[f"{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=g)
        lora[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g)
    from diffsynth_templates.pipelines.lora import split_lora
    from diffsynth_templates.pipelines.lora_files import convert_lora, export_lora

    exported = export_lora(lora, pipe.family, "comfyui")
    assert set(exported) == {
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
    }
    back = split_lora(convert_lora(exported, pipe.family, dit))
    want = split_lora(lora)
    for name in ("to_q", "to_k", "to_v"):
        module = f"transformer_blocks.0.attn.{name}"
        a, b = back[module]
        delta = b @ a
        expected = want[module][1] @ want[module][0] if module in want else torch.zeros_like(delta)
        assert torch.allclose(delta, expected, atol=1e-5)
    with pytest.raises(LoRAError, match="not one of"):
        export_lora(lora, pipe.family, "kohya")
