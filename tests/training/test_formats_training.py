"""train.py with the ecosystem's formats: ``--transformer FILE.safetensors`` (a BFL single file of the
base DiT) trains exactly like the folder, and ``--lora_export_format`` writes the DiT LoRA in the
ComfyUI (BFL) and diffusers layouts next to ours."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.training.config import ConfigError, parse_args
from diffsynth_templates.training.trainer import run
from tests.pipelines.test_single_file import to_bfl
from tests.training.helpers import SMALL

LORA = ["--trainable_models", "dit_lora", "--lora_rank", 2, "--lora_alpha", 3, "--lora_target_modules",
        "to_q,to_k,to_v,attn.to_out", "--max_steps", 2, "--learning_rate", 0.05]  # fmt: skip
CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, cfg_scale=1.0, seed=0, output_type="np", progress=False)  # fmt: skip


def config(*args):
    return parse_args([str(a) for a in args])


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_single_file_base_and_lora_export(base_model, dataset, tmp_path, fmt):
    pipe = Flux2ImagePipeline.from_pretrained(base_model, device="cpu")
    single = tmp_path / "dit_bfl.safetensors"
    save_file(to_bfl(pipe.dit), str(single))
    common = ["--task", "full", "--model", base_model, "--dataset_metadata_path", dataset, *SMALL, *LORA]
    folder = run(config(*common, "--output_path", tmp_path / "folder"))
    from_file = run(config(*common, "--output_path", tmp_path / "file", "--transformer", single,
                           "--lora_export_format", fmt))  # fmt: skip
    np.testing.assert_allclose(from_file.losses, folder.losses, rtol=0, atol=1e-6)  # the same weights

    exported = from_file.checkpoint / f"dit_lora_{fmt}.safetensors"
    keys = list(load_file(str(exported)))
    prefix = (
        "diffusion_model.double_blocks.0.img_attn.qkv."
        if fmt == "comfyui"
        else "transformer.transformer_blocks."
    )
    assert any(k.startswith(prefix) for k in keys), keys[:4]
    ours = load_file(str(from_file.checkpoint / "dit_lora.safetensors"))
    expected = pipe(**CALL, lora=ours)
    assert np.abs(expected - pipe(**CALL)).max() > 1e-5
    pipe.load_lora(exported)
    assert np.abs(pipe(**CALL) - expected).max() <= 1e-5


def test_export_format_needs_a_dit_lora(base_model):
    with pytest.raises(ConfigError, match="dit_lora"):
        config("--task", "full", "--model", base_model, "--lora_export_format", "comfyui")
    with pytest.raises(ConfigError, match="comfyui"):
        config("--task", "full", "--model", base_model, "--lora_export_format", "kohya", *LORA)
