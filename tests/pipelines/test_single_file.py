"""Single-file FLUX.2-klein transformers: the BFL / ComfyUI layout (bf16/fp32 and fp8-scaled) against
the diffusers-folder model of the same weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffsynth_templates.backbones.flux2_dit import Flux2DiT
from diffsynth_templates.loading.safetensors_io import CheckpointError
from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.pipelines.families.checkpoint_layout import join, parameter_modules
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.lora_files import swap_halves
from diffsynth_templates.pipelines.single_file import SingleFileError, load_single_file_dit

pytestmark = pytest.mark.usefixtures("one_thread")

H = W = 64
PROMPTS = ["a photo of a cat sitting on a windowsill", "a red car", "a bowl of fruit", "mountains at dawn"]
FLUX2 = FAMILIES["flux2"]


def to_bfl(dit: Flux2DiT, layout=FLUX2.checkpoint_layout) -> dict[str, torch.Tensor]:
    """Our weights in the BFL naming (fused qkv, swapped output AdaLN, norm scales), or another
    family's native ``layout``."""
    state = dit.state_dict()
    out: dict[str, list] = {}
    for name in parameter_modules(dit):
        slot = layout.slot(name)
        renames = dict(slot.params)
        for param, _ in dit.get_submodule(name).named_parameters(recurse=False):
            key = join(slot.module, renames.get(param, param))
            out.setdefault(key, []).append((slot, state[join(name, param)]))
    bfl = {}
    for key, parts in out.items():
        value = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0].index)])
        bfl[key] = swap_halves(value) if parts[0][0].swap_halves else value
    return {k: v.contiguous() for k, v in bfl.items()}


def fp8_scaled(bfl: dict[str, torch.Tensor], name="scale_weight", per_row=False) -> dict[str, torch.Tensor]:
    """ComfyUI's fp8_scaled: each Linear weight in e4m3 with a per-tensor ``scale_weight`` (newer
    files: ``weight_scale``, possibly one per output row)."""
    out = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in bfl.items():
        if value.ndim == 2:
            amax = value.abs().amax(dim=1, keepdim=True) if per_row else value.abs().max()
            scale = amax.float().clamp_min(1e-12) / 448
            out[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            out[key.removesuffix(".weight") + f".{name}"] = scale.reshape(-1) if per_row else scale.reshape(1)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def folder_pipe(tiny_klein_root):
    return Flux2ImagePipeline.from_pretrained(tiny_klein_root, torch_dtype=torch.float32, device="cpu")


def images(pipe):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(len(PROMPTS), 128, H // 16, W // 16, generator=g)
    return pipe(
        prompt=PROMPTS, height=H, width=W, num_inference_steps=4, latents=latents, output_type="np",
        cfg_scale=4.0, max_sequence_length=32, progress=False,
    )  # fmt: skip


def test_bfl_layout_is_diffusers_single_file_layout(folder_pipe):
    """Our BFL naming, read back by diffusers' own converter, gives the folder's weights exactly."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    back = convert_flux2_transformer_checkpoint_to_diffusers(to_bfl(folder_pipe.dit))
    state = folder_pipe.dit.state_dict()
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bfl_single_file_equals_the_folder_model(folder_pipe, tiny_klein_root, tmp_path, prefix, dtype):
    path = tmp_path / "klein.safetensors"
    save_file({prefix + k: v.to(dtype) for k, v in to_bfl(folder_pipe.dit).items()}, str(path))
    folder = Flux2DiT.from_pretrained(tiny_klein_root / "transformer", torch_dtype=dtype)
    for config_folder in (tiny_klein_root / "transformer", None):  # config.json, or read from the shapes
        dit = load_single_file_dit(FLUX2, path, config_folder, torch_dtype=dtype)
        state = folder.state_dict()
        assert all(torch.equal(v, state[k]) and v.dtype == dtype for k, v in dit.state_dict().items())


def test_transformer_file_through_from_pretrained_gives_the_same_image(
    folder_pipe, tiny_klein_root, tmp_path
):
    path = tmp_path / "klein.safetensors"
    save_file(to_bfl(folder_pipe.dit), str(path))
    pipe = Flux2ImagePipeline.from_pretrained(
        tiny_klein_root, torch_dtype=torch.float32, device="cpu", transformer=str(path)
    )
    assert np.array_equal(images(pipe), images(folder_pipe))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([10 * np.log10(1 / np.mean((x - y) ** 2)) for x, y in zip(a, b, strict=True)]))


@pytest.mark.parametrize(("name", "per_row"), [("scale_weight", False), ("weight_scale", True)])
def test_fp8_scaled_single_file_within_psnr(folder_pipe, tiny_klein_root, tmp_path, name, per_row):
    path = tmp_path / "klein_fp8_scaled.safetensors"
    save_file(fp8_scaled(to_bfl(folder_pipe.dit), name, per_row), str(path))
    pipe = Flux2ImagePipeline.from_pretrained(
        tiny_klein_root, torch_dtype=torch.float32, device="cpu", transformer=str(path)
    )
    ref, got = images(folder_pipe), images(pipe)
    assert not np.array_equal(ref, got)  # it really is the quantized weights
    assert psnr(ref, got) >= 38.0, psnr(ref, got)


def test_unknown_layout_is_a_clear_error(folder_pipe, tiny_klein_root, tmp_path):
    bfl = to_bfl(folder_pipe.dit)
    bfl["double_blocks.0.img_attn.extra.weight"] = torch.zeros(2, 2)
    del bfl["single_blocks.1.linear2.weight"]
    path = tmp_path / "odd.safetensors"
    save_file(bfl, str(path))
    with pytest.raises(SingleFileError, match=r"missing \['single_blocks\.1\.linear2\.weight'\].*extra"):
        load_single_file_dit(FLUX2, path, tiny_klein_root / "transformer")
    path = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="config"):
        load_single_file_dit(FLUX2, path)
