"""A ComfyUI-style fp8-scaled single file (loaded dequantized by pipelines/single_file.py) stored again
in FP8 by ``loading.quantize``: with per-row scales nothing is lost, so the images are those of the
dequantized file bit for bit, at about half the weight bytes."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import save_file

from diffsynth_templates.loading.quantize import FP8Linear, module_weight_bytes, store_weights
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from tests.pipelines.test_single_file import fp8_scaled, images, to_bfl


def test_fp8_scaled_file_restored_in_fp8_is_lossless(tiny_klein_root, tmp_path):
    folder = Flux2ImagePipeline.from_pretrained(tiny_klein_root, torch_dtype=torch.float32, device="cpu")
    path = tmp_path / "klein_fp8_scaled.safetensors"
    save_file(fp8_scaled(to_bfl(folder.dit), "weight_scale", per_row=True), str(path))

    def load():
        return Flux2ImagePipeline.from_pretrained(
            tiny_klein_root, torch_dtype=torch.float32, device="cpu", transformer=str(path)
        )

    wide = load()
    restored = load()
    before = module_weight_bytes(restored.dit)
    store_weights(restored.dit, torch.float8_e4m3fn, skip=(), min_elements=1)  # the tiny DiT: every Linear
    assert sum(isinstance(m, FP8Linear) for m in restored.dit.modules()) > 10
    assert module_weight_bytes(restored.dit) < 0.3 * before  # fp32 -> fp8 + one scale per row
    assert np.array_equal(images(restored), images(wide))
