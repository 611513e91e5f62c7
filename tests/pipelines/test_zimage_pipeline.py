"""ZImagePipeline end to end against diffusers' ZImagePipeline on a tiny official-layout folder.

The folder is written the way the official Z-Image repos are: transformer/ (ZImageTransformer2DModel,
sharded), vae/ (AutoencoderKL, 16 latent channels, scaling and shift factors, no quant convs),
text_encoder/ (Qwen3ForCausalLM), tokenizer/ (tokenizer.json with Qwen's special tokens and a
tokenizer_config.json carrying the chat template) and scheduler/ (static shift 3.0). Its name
contains "turbo", so the pipeline picks the Turbo defaults (the folder is built by tests/tiny_zimage.py).

What it shares with Flux2ImagePipeline (CFG batching, template KV, inpainting, img2img) is tested once
for both in tests/pipelines/test_pipeline_families.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates import KVCacheError
from diffsynth_templates.pipelines.zimage_pipeline import (
    VARIANTS,
    ZImagePipeline,
    chat_prompt,
    zimage_schedule,
)
from tests.tiny_zimage import SCHEDULER

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

H = W = 32  # the tiny VAE downsamples by 2: latents 16 x 16, 8 x 8 = 64 image tokens
LATENT = H // 2
PROMPT = "a photo of a cat sitting on a windowsill"
NEGATIVE = "a red car parked in the street at night, blurry"  # a longer caption: a ragged CFG batch
STEPS = 3


@pytest.fixture(scope="module")
def root(tiny_zimage_root) -> Path:
    return tiny_zimage_root


@pytest.fixture(scope="module")
def pipe(root):
    return ZImagePipeline.from_pretrained(root, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def reference(root):
    """diffusers' ZImagePipeline on the same folder, built from its parts."""
    return diffusers.ZImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=diffusers.AutoencoderKL.from_pretrained(root / "vae").eval(),
        text_encoder=transformers.Qwen3ForCausalLM.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        transformer=diffusers.ZImageTransformer2DModel.from_pretrained(root / "transformer").eval(),
    )


def noise(batch=1, seed=0):
    return torch.randn(batch, 16, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def run(pipe, **kw):
    args = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=H,
        width=W,
        num_inference_steps=STEPS,
        cfg_scale=1.0,
        latents=noise(),
        output_type="np",
        max_sequence_length=64,
    )
    return pipe(**{**args, **kw}, progress=False)


def run_reference(reference, guidance_scale, output_type="np", **kw):
    with torch.no_grad():
        return reference(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=H,
            width=W,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            latents=noise(),
            output_type=output_type,
            max_sequence_length=64,
            **kw,
        ).images


def photo(size=(W, H)):
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).convert("RGB").resize(size)


# --- parity with diffusers ------------------------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0], ids=["turbo-no-cfg", "cfg"])
def test_matches_diffusers(pipe, reference, guidance_scale):
    ours = run(
        pipe, cfg_scale=guidance_scale + 1
    )  # diffusers: pos + g (pos - neg); ours: neg + s (pos - neg)
    theirs = run_reference(reference, guidance_scale)
    assert ours.shape == theirs.shape == (1, H, W, 3)
    assert np.abs(ours - theirs).max() <= 1e-3
    assert ours.std() > 0.01  # a real image, not a constant


def test_latent_output_matches_diffusers(pipe, reference):
    ours = run(pipe, cfg_scale=4.0, output_type="latent")
    theirs = run_reference(reference, 3.0, output_type="latent")
    assert ours.shape == theirs.shape == (1, 16, LATENT, LATENT)
    assert (ours - theirs).abs().max() <= 1e-4


def test_prompt_features_match_diffusers(pipe, reference):
    prompts = [PROMPT, "", "a red car " * 12]  # different lengths, one truncated at 32 tokens
    ours = pipe.encode_prompt(prompts, max_sequence_length=32)
    with torch.no_grad():
        theirs, _ = reference.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, max_sequence_length=32
        )
    assert [o.shape for o in ours] == [t.shape for t in theirs]
    assert len(ours[2]) == 32 and len(ours[1]) < len(ours[0])
    assert max((o - t).abs().max().item() for o, t in zip(ours, theirs)) <= 1e-5
    template = reference.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=True,
    )
    assert chat_prompt(PROMPT) == template


@pytest.mark.parametrize("steps", [1, 8, 50])
def test_schedule_matches_the_scheduler(steps):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        **{k: v for k, v in SCHEDULER.items() if k[0] != "_"}
    )
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=0.0)
    ours = zimage_schedule(steps, shift=3.0)
    assert torch.equal(ours.sigmas, scheduler.sigmas) and torch.equal(ours.timesteps, scheduler.timesteps)


# --- variant defaults --------------------------------------------------------------------------------


def test_variant_defaults(pipe, root):
    assert pipe.variant == "turbo" and pipe.shift == 3.0
    calls = []
    handle = pipe.dit.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    try:
        pipe(PROMPT, height=H, width=W, latents=noise(), output_type="latent", progress=False)
    finally:
        handle.remove()
    assert calls == [1] * 8  # Turbo: 8 steps, no CFG
    base = ZImagePipeline.from_pretrained(root, torch_dtype=torch.float32, device="cpu", variant="base")
    assert base.defaults == VARIANTS["base"] and (
        base.defaults.num_inference_steps,
        base.defaults.cfg_scale,
    ) == (
        50,
        5.0,
    )


# --- bad inputs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(height=30), ValueError, "multiple of 4"),
        (dict(latents=torch.zeros(1, 16, 8, 8)), ValueError, "latents have shape"),
        (dict(inpaint_mask=np.zeros((H, W))), ValueError, "needs input_image"),
        (dict(kv_cache={"block_9": (torch.zeros(1, 1, 2, 32),) * 2}), KVCacheError, "kv_cache.*block_9"),
        (dict(extra_text_embedding=torch.zeros(1, 2, 31)), ValueError, "extra_text_embedding"),
    ],
)
def test_bad_inputs_are_named(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        run(pipe, **kwargs)


def test_save_pretrained_round_trip_loads_in_diffusers(pipe, tmp_path):
    saved = pipe.save_pretrained(tmp_path / "saved")
    ours = ZImagePipeline.from_pretrained(saved, torch_dtype=torch.float32, device="cpu", variant="turbo")
    expected = run(pipe, cfg_scale=2.0)
    assert np.array_equal(run(ours, cfg_scale=2.0), expected)
    theirs = diffusers.ZImagePipeline.from_pretrained(saved)
    with torch.no_grad():
        image = theirs(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=H,
            width=W,
            num_inference_steps=STEPS,
            guidance_scale=1.0,
            latents=noise(),
            output_type="np",
            max_sequence_length=64,
        ).images
    assert np.abs(image - expected).max() <= 1e-3
