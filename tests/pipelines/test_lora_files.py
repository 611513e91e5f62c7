"""LoRA files of the ecosystem against diffusers' ``load_lora_weights`` on a tiny official-layout klein.

One random LoRA in FLUX.2's native (BFL) naming is written in each layout (BFL / ai-toolkit, kohya,
diffusers / PEFT), loaded into our pipeline and into diffusers' ``Flux2KleinPipeline``, and both sample
from the same noise.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.pipelines.families.checkpoint_layout import linear_modules
from diffsynth_templates.pipelines.lora import LoRAError

pytestmark = pytest.mark.usefixtures("one_thread")

H = W = 64
PROMPT = "a photo of a cat sitting on a windowsill"
STEPS = 3
RANK = 4
# the modules every converter of diffusers reads (its kohya one skips the modulation layers)
SKIP = ("_modulation", "guidance_in", "final_layer.adaLN_modulation")


def bfl_lora(dit, seed=0, skip=SKIP) -> dict[str, torch.Tensor]:
    """A random LoRA on every native module, ``{native: (A, B)}`` flattened to BFL keys (no prefix)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(dit.named_modules())
    out = {}
    for native, members in FAMILIES["flux2"].checkpoint_layout.native_groups(linear_modules(dit)).items():
        if any(s in native for s in skip):
            continue
        rows = sum(modules[name].out_features for name, _ in members)
        cols = modules[members[0][0]].in_features
        out[f"{native}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) * 0.3
        out[f"{native}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.3
    return out


def as_layout(bfl: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "bfl":
        return {f"diffusion_model.{k}": v for k, v in bfl.items()}
    if layout == "kohya":  # lora_down / lora_up with alpha = rank / 2: B doubled keeps the same delta
        out = {}
        for k, v in bfl.items():
            module, part = k.rsplit(".lora_", 1)
            kohya = "lora_unet_" + module.replace(".", "_")
            if part.startswith("A"):
                out[f"{kohya}.lora_down.weight"] = v
                out[f"{kohya}.alpha"] = torch.tensor(RANK / 2)
            else:
                out[f"{kohya}.lora_up.weight"] = v * 2
        return out
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers

    return {
        k: v.contiguous()
        for k, v in _convert_non_diffusers_flux2_lora_to_diffusers(as_layout(bfl, "bfl")).items()
    }


def noise():
    return torch.randn(1, 128, H // 16, W // 16, generator=torch.Generator().manual_seed(0))


def ours(pipe, cfg):
    return pipe(
        prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, latents=noise(), output_type="np",
        cfg_scale=cfg, max_sequence_length=32, progress=False,
    )  # fmt: skip


def theirs(reference, cfg):
    with torch.no_grad():
        return reference(
            prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, guidance_scale=cfg, latents=noise(),
            output_type="np", max_sequence_length=32,
        ).images  # fmt: skip


@pytest.mark.parametrize("layout", ["bfl", "kohya", "diffusers"])
def test_layouts_match_diffusers(pipe, reference, tmp_path, layout):
    path = tmp_path / f"{layout}.safetensors"
    save_file(as_layout(bfl_lora(pipe.dit), layout), str(path))
    weights = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    base = ours(pipe, 1.0)
    name = pipe.load_lora(path)
    reference.load_lora_weights(str(path), adapter_name=layout)
    try:
        for scale in (1.0, 0.5):
            pipe.set_lora_scale(name, scale)
            reference.set_adapters([layout], [scale])
            for cfg in (1.0, 4.0):
                a, b = ours(pipe, cfg), theirs(reference, cfg)
                assert np.abs(a - b).max() <= 1e-3, (layout, scale, cfg, np.abs(a - b).max())
                if cfg == 1.0:
                    assert np.abs(a - base).max() > 1e-2  # the LoRA does something
    finally:
        reference.unload_lora_weights()
        pipe.unload_lora()
    assert np.array_equal(ours(pipe, 1.0), base)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.dit.state_dict().items())


def test_lora_down_up_without_prefix_equals_lora_a_b(pipe):
    bfl = bfl_lora(pipe.dit, seed=1)
    renamed = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in bfl.items()}
    pipe.load_lora(as_layout(bfl, "bfl"), adapter_name="ab")
    a = ours(pipe, 1.0)
    pipe.unload_lora("ab")
    pipe.load_lora(renamed, adapter_name="down_up")
    b = ours(pipe, 1.0)
    pipe.unload_lora()
    assert np.array_equal(a, b)


def test_loras_compose_and_fuse_unfuse_is_bit_exact(pipe):
    weights = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    first, second = bfl_lora(pipe.dit, seed=2), bfl_lora(pipe.dit, seed=3)
    pipe.load_lora(first, scale=0.5, adapter_name="one")
    one = ours(pipe, 1.0)
    pipe.load_lora(second, scale=0.7, adapter_name="two")
    both = ours(pipe, 1.0)
    assert np.abs(both - one).max() > 1e-2
    pipe.fuse_lora()
    assert not all(torch.equal(v, weights[k]) for k, v in pipe.dit.state_dict().items())
    fused = ours(pipe, 1.0)
    assert np.abs(fused - both).max() <= 1e-3  # the same delta, added to the weights
    with pytest.raises(LoRAError, match="unfuse_lora"):
        pipe.unload_lora("one")
    pipe.unfuse_lora()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.dit.state_dict().items())
    assert np.array_equal(ours(pipe, 1.0), both)
    pipe.unload_lora()


def test_loaded_lora_composes_with_a_template_lora(pipe):
    file_lora = bfl_lora(pipe.dit, seed=4)
    template = {}
    dit_modules = dict(pipe.dit.named_modules())
    g = torch.Generator().manual_seed(5)
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_out"):
        layer = dit_modules[name]
        template[f"{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=g) * 0.3
        template[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=g) * 0.3
    pipe.load_lora(file_lora, adapter_name="file")
    combined = pipe(
        prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, latents=noise(), output_type="np",
        cfg_scale=1.0, max_sequence_length=32, progress=False, lora=template,
    )  # fmt: skip
    pipe.fuse_lora()
    fused = pipe(
        prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, latents=noise(), output_type="np",
        cfg_scale=1.0, max_sequence_length=32, progress=False, lora=template,
    )  # fmt: skip
    pipe.unfuse_lora()
    pipe.unload_lora()
    assert np.abs(combined - fused).max() <= 1e-3
    assert np.abs(combined - ours(pipe, 1.0)).max() > 1e-2


def test_unmatched_and_foreign_loras_are_named(pipe, pipes):
    bfl = as_layout(bfl_lora(pipe.dit), "bfl")
    bfl["diffusion_model.double_blocks.7.img_attn.qkv.lora_A.weight"] = torch.zeros(RANK, 32)
    bfl["diffusion_model.double_blocks.7.img_attn.qkv.lora_B.weight"] = torch.zeros(96, RANK)
    with pytest.raises(LoRAError, match=r"1 modules .*double_blocks\.7\.img_attn\.qkv.*matched"):
        pipe.load_lora(bfl)
    zimage_dit = pipes["zimage"].dit
    zimage = {}
    for name in linear_modules(zimage_dit)[:6]:
        layer = dict(zimage_dit.named_modules())[name]
        zimage[f"diffusion_model.{name}.lora_A.weight"] = torch.zeros(2, layer.in_features)
        zimage[f"diffusion_model.{name}.lora_B.weight"] = torch.zeros(layer.out_features, 2)
    with pytest.raises(LoRAError, match="this LoRA is for Z-Image"):
        pipe.load_lora(zimage)
    dora = {"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(32)}
    with pytest.raises(LoRAError, match="DoRA"):
        pipe.load_lora(dora)
    assert not pipe.lora_adapters


def test_output_adaln_lora_follows_the_bfl_weight_order(pipe, tiny_klein_root, tmp_path):
    """A BFL LoRA on ``final_layer.adaLN_modulation.1`` (rows: shift, scale) lands on our
    ``norm_out.linear`` (rows: scale, shift) exactly as the same delta added to the BFL single file's
    weight does (ComfyUI's reading; diffusers' LoRA converter does not swap these rows)."""
    from diffsynth_templates.pipelines.single_file import load_single_file_dit
    from tests.pipelines.test_single_file import to_bfl

    g = torch.Generator().manual_seed(6)
    a = torch.randn(RANK, pipe.dit.norm_out.linear.in_features, generator=g) * 0.3
    b = torch.randn(pipe.dit.norm_out.linear.out_features, RANK, generator=g) * 0.3
    key = "final_layer.adaLN_modulation.1"
    pipe.load_lora({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, adapter_name="head")
    pipe.fuse_lora()
    fused = pipe.dit.norm_out.linear.weight.clone()
    pipe.unfuse_lora()
    pipe.unload_lora()
    bfl = to_bfl(pipe.dit)
    bfl[f"{key}.weight"] = bfl[f"{key}.weight"] + b @ a
    path = tmp_path / "head.safetensors"
    save_file(bfl, str(path))
    dit = load_single_file_dit(FAMILIES["flux2"], path, tiny_klein_root / "transformer")
    assert torch.allclose(dit.norm_out.linear.weight, fused, atol=1e-6)


def test_adapter_misuse_is_named(pipe, tmp_path):
    lora = as_layout(bfl_lora(pipe.dit), "bfl")
    name = pipe.load_lora(lora, adapter_name="x")
    try:
        with pytest.raises(LoRAError, match="loaded already"):
            pipe.load_lora(lora, adapter_name="x")
        with pytest.raises(LoRAError, match="finite number"):
            pipe.set_lora_scale(name, float("nan"))
        with pytest.raises(LoRAError, match=r"no LoRA named 'y'.*\['x'\]"):
            pipe.set_lora_scale("y", 1.0)
    finally:
        pipe.unload_lora()
    (tmp_path / "lora.ckpt").write_bytes(b"not read")
    with pytest.raises(LoRAError, match="safetensors"):
        pipe.load_lora(tmp_path / "lora.ckpt")
    unpaired = {k: v for k, v in lora.items() if not k.endswith("img_attn.proj.lora_B.weight")}
    with pytest.raises(LoRAError, match=r"img_attn\.proj' has no lora_B"):
        pipe.load_lora(unpaired)
    assert not pipe.lora_adapters
