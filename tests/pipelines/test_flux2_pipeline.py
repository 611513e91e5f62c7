"""Flux2ImagePipeline end to end against diffusers' Flux2KleinPipeline on a tiny official-layout folder.

What it shares with ZImagePipeline (CFG batching, template KV, inpainting, img2img) is tested once for
both in tests/pipelines/test_pipeline_families.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates.loading.resolve import ModelNotFoundError, resolve_model_path
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline

H = W = 64
PROMPT = "a photo of a cat sitting on a windowsill"
STEPS = 3


def noise(batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 128, H // 16, W // 16, generator=g)


def run(pipe, **kw):
    args = dict(
        prompt=PROMPT, height=H, width=W, num_inference_steps=STEPS, latents=noise(), output_type="np"
    )
    args.update(kw)
    return pipe(**args, progress=False)


def photo(size=(W, H), name="astronaut"):
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size)


@pytest.mark.parametrize("cfg_scale", [4.0, 1.0])
def test_matches_diffusers(pipe, reference, cfg_scale):
    ours = run(pipe, cfg_scale=cfg_scale, max_sequence_length=64)
    with torch.no_grad():
        theirs = reference(
            prompt=PROMPT,
            height=H,
            width=W,
            num_inference_steps=STEPS,
            guidance_scale=cfg_scale,
            latents=noise(),
            output_type="np",
            max_sequence_length=64,
        ).images
    assert ours.shape == theirs.shape == (1, H, W, 3)
    assert np.abs(ours - theirs).max() <= 1e-3
    assert ours.std() > 0.01  # a real image, not a constant


def test_edit_image_matches_diffusers(pipe, reference):
    edit = photo()
    ours = run(pipe, cfg_scale=4.0, max_sequence_length=32, edit_image=[edit])
    with torch.no_grad():
        theirs = reference(
            image=[edit],
            prompt=PROMPT,
            height=H,
            width=W,
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            latents=noise(),
            output_type="np",
            max_sequence_length=32,
        ).images
    assert np.abs(ours - theirs).max() <= 1e-3
    assert np.abs(ours - run(pipe, cfg_scale=4.0, max_sequence_length=32)).max() > 1e-3


def test_latent_output_matches_diffusers(pipe, reference):
    ours = run(pipe, cfg_scale=1.0, max_sequence_length=32, output_type="latent")
    with torch.no_grad():
        theirs = reference(
            prompt=PROMPT,
            height=H,
            width=W,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            latents=noise(),
            output_type="latent",
            max_sequence_length=32,
        ).images
    assert ours.shape == theirs.shape == (1, 32, H // 8, W // 8)
    assert (ours - theirs).abs().max() <= 1e-4


def test_offload_gives_the_same_image(tiny_klein_root):
    pipe = Flux2ImagePipeline.from_pretrained(tiny_klein_root, torch_dtype=torch.float32, device="cpu")
    base = run(pipe, cfg_scale=2.0, max_sequence_length=16)
    pipe.enable_model_cpu_offload("cpu")
    assert np.array_equal(run(pipe, cfg_scale=2.0, max_sequence_length=16), base)


def test_vae_tiling_runs(pipe):
    pipe.enable_vae_tiling(4)
    try:
        tiled = run(pipe, cfg_scale=1.0, max_sequence_length=16, height=96, width=96, latents=None, seed=0)
    finally:
        pipe.vae_tile_size = None
    assert tiled.shape == (1, 96, 96, 3)


def test_per_component_sources(tiny_klein_root, tmp_path):
    base_repo, klein_repo = tmp_path / "base", tmp_path / "klein"
    shutil.copytree(tiny_klein_root / "transformer", base_repo / "transformer")
    for name in ("text_encoder", "vae", "tokenizer"):
        shutil.copytree(tiny_klein_root / name, klein_repo / name)
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        Flux2ImagePipeline.from_pretrained(base_repo, device="cpu")
    pipe = Flux2ImagePipeline.from_pretrained(
        base_repo, device="cpu", text_encoder=klein_repo, vae=klein_repo / "vae", tokenizer=klein_repo
    )
    assert run(pipe, cfg_scale=1.0, max_sequence_length=16).shape == (1, H, W, 3)


def test_bf16_runs(tiny_klein_root):
    pipe = Flux2ImagePipeline.from_pretrained(tiny_klein_root, torch_dtype=torch.bfloat16, device="cpu")
    out = run(pipe, cfg_scale=2.0, max_sequence_length=16)
    assert np.isfinite(out).all() and out.shape == (1, H, W, 3)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(height=72), ValueError, "height=72 is not a multiple of 16; use 64 or 80"),
        (dict(width=8), ValueError, "width must be an integer >= 16"),
        (dict(output_type="tensor"), ValueError, "output_type"),
        (dict(prompt=3), TypeError, "prompt must be a string"),
        (dict(negative_prompt=["a", "b"]), ValueError, "negative_prompt has 2 entries"),
        (dict(inpaint_mask=np.zeros((H, W))), ValueError, "inpaint_mask needs input_image"),
        (dict(denoising_strength=0.5), ValueError, "needs an input_image"),
        (dict(latents=torch.zeros(1, 128, 3, 3)), ValueError, r"latents have shape \(1, 128, 3, 3\)"),
        (dict(input_image=np.zeros((H, W))), ValueError, r"input_image array has shape"),
        (dict(input_image="cat.png"), TypeError, "input_image must be a PIL image"),
        (dict(kv_cache={"double_7": (torch.zeros(1, 1, 2, 16),) * 2}), ValueError, "double_7"),
        (
            dict(lora={"nope.lora_A.weight": torch.zeros(1, 4), "nope.lora_B.weight": torch.zeros(4, 1)}),
            ValueError,
            "nope",
        ),
        (dict(extra_text_embedding=torch.zeros(1, 2, 5)), ValueError, "extra_text_embedding has shape"),
    ],
)
def test_bad_inputs_are_named(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(pipe, cfg_scale=2.0, max_sequence_length=16, **kwargs)


def test_offline_mode_without_cache_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_TEMPLATES_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline mode is on"):
        resolve_model_path("black-forest-labs/FLUX.2-klein-base-4B", cache_dir=tmp_path)
    with pytest.raises(ModelNotFoundError, match="not an existing folder"):
        resolve_model_path(str(tmp_path / "missing" / "deeper" / "x"))


def test_save_pretrained_round_trip(tmp_path):
    from diffsynth_templates.pipelines.random_init import random_flux2_pipeline

    pipe = random_flux2_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    again = Flux2ImagePipeline.from_pretrained(tmp_path / "model", torch_dtype=torch.float32, device="cpu")
    kw = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=1, output_type="np",
              max_sequence_length=32, progress=False)  # fmt: skip
    assert np.array_equal(pipe(**kw), again(**kw))


def _random_kv(dit, length: int, seed: int, blocks=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    specs = dit.kv_block_specs
    return {
        name: tuple(torch.randn(1, length, s.heads, s.head_dim, generator=g) for _ in range(2))
        for name, s in specs.items()
        if blocks is None or name in blocks
    }


def test_long_one_sided_kv_runs_two_passes(pipe):
    """Padding the negative side to a long positive cache would make attention visit mostly masked
    tokens: beyond MAX_PADDING_FRACTION of the row's own tokens the sides run as two passes."""
    from diffsynth_templates.pipelines.common import MAX_PADDING_FRACTION

    own = 16 + (H // 16) * (W // 16)  # text + image tokens
    long_kv = _random_kv(pipe.dit, int(MAX_PADDING_FRACTION * own) + 1, 0)
    calls = []
    handle = pipe.dit.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        run(pipe, cfg_scale=3.0, max_sequence_length=16, kv_cache=long_kv)
    finally:
        handle.remove()
    assert calls == [1, 1] * STEPS
