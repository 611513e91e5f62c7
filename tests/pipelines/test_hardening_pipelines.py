"""Hardening of the base pipelines' call arguments: masks placed like their images, finite values,
sizes / steps / seeds refused before any compute with the argument named, unknown prompt words."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.loading.finite import NonFiniteError
from diffsynth_templates.pipelines.common import PipelineInputError
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.flux2_prompt import Flux2PromptEncoder
from diffsynth_templates.pipelines.image_io import (
    MaskSizeError,
    image_to_tensor,
    inpaint_pair,
    paste_unmasked,
    place_image_and_mask,
    place_mask,
    resize_image,
)
from diffsynth_templates.pipelines.random_init import random_flux2_pipeline, random_zimage_pipeline
from diffsynth_templates.pipelines.zimage_pipeline import ZImagePromptEncoder

CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, max_sequence_length=16)
TOY = "models/toy/base"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return random_flux2_pipeline()


@pytest.fixture(scope="module")
def zpipe():
    return random_zimage_pipeline()


def wide_image_and_mask() -> tuple[Image.Image, np.ndarray]:
    """A 96 x 64 (width x height) image whose right quarter is marked for regeneration."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = np.zeros((64, 96), np.uint8)
    mask[:, 72:] = 255
    return image, mask


# -- masks placed like their images -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_kept_pixels_are_the_input_at_another_aspect_ratio(pipe, zpipe, family):
    # 96 x 64 onto 32 x 32: the image is scaled by 1/2 to 48 x 32 and 8 columns are cropped each side,
    # so the masked source columns 72..95 land on output columns 28..31 and columns 0..27 are kept.
    # Stretching the mask instead (the old behaviour) would regenerate columns 24..27 as well.
    image, mask = wide_image_and_mask()
    target = pipe if family == "flux2" else zpipe
    out = target(
        **CALL, input_image=image, inpaint_mask=mask, cfg_scale=1.0, output_type="np", progress=False
    )
    expected = ((resize_image(image_to_tensor(image), 32, 32)[0] + 1) / 2).permute(1, 2, 0).numpy()
    assert np.abs(out[0][:, :28] - expected[:, :28]).max() <= 1e-6
    assert np.abs(out[0][:, 29:] - expected[:, 29:]).mean() > 1e-3  # the masked columns were regenerated
    placed = place_mask(inpaint_pair(image, mask)[1], 32, 32)[0, 0]
    assert placed[:, :28].max() == 0 and placed[:, 29:].min() == 1


def test_mask_and_image_share_one_placement():
    # a smooth image whose red channel is also used as its mask: wherever either is placed, the
    # placed mask equals the placed red channel (up to the image's antialiasing filter)
    y, x = np.mgrid[0:64, 0:96].astype(np.float32)
    red = (x / 95 + y / 63) / 2
    image = np.stack([red, 1 - red, np.full_like(red, 0.5)], axis=-1)
    pixels, mask = inpaint_pair(image, red)
    for height, width in [(32, 32), (64, 32), (16, 48), (48, 48), (128, 64)]:
        placed_pixels, placed_mask = place_image_and_mask(pixels, mask, height, width)
        assert placed_pixels.shape[-2:] == placed_mask.shape[-2:] == (height, width)
        assert (placed_mask - (placed_pixels[:, :1] + 1) / 2).abs().max() < 0.02, (height, width)


def test_a_mask_of_another_size_is_an_error_naming_both_sizes(pipe):
    image, _ = wide_image_and_mask()
    small = np.zeros((32, 48), np.uint8)
    with pytest.raises(MaskSizeError, match=r"inpaint_mask is 48x32 .* input_image is 96x64"):
        pipe(**CALL, input_image=image, inpaint_mask=small, progress=False)
    with pytest.raises(MaskSizeError, match="resize_mask=True"):
        paste_unmasked(torch.zeros(1, 3, 32, 32), image, small)


def test_resize_mask_stretches_the_mask_to_its_image_first(pipe):
    image, mask = wide_image_and_mask()
    small = np.asarray(Image.fromarray(mask).resize((48, 32), Image.NEAREST))
    stretched = pipe(**CALL, input_image=image, inpaint_mask=small, resize_mask=True, output_type="np", progress=False)  # fmt: skip
    direct = pipe(**CALL, input_image=image, inpaint_mask=mask, output_type="np", progress=False)
    keep = np.zeros((32, 32), bool)
    keep[:, :27] = True
    assert np.abs(stretched[0][keep] - direct[0][keep]).max() <= 1e-6
    with pytest.raises(PipelineInputError, match="resize_mask must be True or False"):
        pipe(**CALL, input_image=image, inpaint_mask=small, resize_mask="yes", progress=False)


# -- finite values ------------------------------------------------------------------------------------


def _nan_kv(pipe):
    spec = pipe.dit.kv_block_specs["single_0"]
    k = torch.full((1, 2, spec.heads, spec.head_dim), math.nan)
    return {"single_0": (k, torch.zeros_like(k))}


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(cfg_scale=math.nan), "cfg_scale"),
        (dict(cfg_scale=math.inf), "cfg_scale"),
        (dict(cfg_scale="4"), "cfg_scale"),
        (dict(denoising_strength=math.nan), "denoising_strength"),
        (dict(latents=torch.full((1, 128, 2, 2), math.nan)), "latents"),
        (dict(latents=np.zeros((1, 128, 2, 2))), "latents"),
        (dict(extra_text_embedding=torch.full((1, 2, 192), math.inf)), "extra_text_embedding"),
        (dict(negative_extra_text_embedding=[1.0], cfg_scale=2.0), "negative_extra_text_embedding"),
        (dict(input_image=torch.full((3, 32, 32), math.nan), denoising_strength=0.5), "input_image"),
        (dict(input_image=np.ones((32, 32, 3)), inpaint_mask=np.full((32, 32), math.nan)), "inpaint_mask"),
    ],
)
def test_non_finite_arguments_are_named(pipe, kwargs, name):
    with pytest.raises(DiffSynthTemplatesError, match=name):
        pipe(**{**CALL, **kwargs}, progress=False)


def test_non_finite_kv_cache_and_lora_are_named(pipe):
    with pytest.raises(NonFiniteError, match=r"kv_cache.*'single_0'.*NaN or inf"):
        pipe(**CALL, kv_cache=_nan_kv(pipe), progress=False)
    with pytest.raises(NonFiniteError, match=r"negative_kv_cache"):
        pipe(**CALL, cfg_scale=2.0, negative_kv_cache=_nan_kv(pipe), progress=False)


def test_a_non_finite_result_raises_instead_of_a_black_image(pipe, zpipe):
    def poison(p, i, t, kw):
        return {"latents": kw["latents"] * math.inf}

    for target in (pipe, zpipe):
        with pytest.raises(NonFiniteError, match="latents after denoising hold NaN or inf"):
            target(**CALL, cfg_scale=1.0, callback_on_step_end=poison, progress=False)


def test_valid_calls_are_unchanged_by_the_checks(pipe):
    # a seed given as a numpy integer is the same seed
    a = pipe(**{**CALL, "seed": 3}, output_type="np", progress=False)
    b = pipe(**{**CALL, "seed": np.int64(3)}, output_type="np", progress=False)
    assert np.array_equal(a, b)


# -- sizes, steps, seeds, prompts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(height=40),
            r"height=40 is not a multiple of 16; use 32 or 48 \(the VAE downsamples 8x and the DiT packs 2x2 patches\)",
        ),  # fmt: skip
        (dict(width=0), "width must be an integer >= 16"),
        (dict(width=-32), "width must be an integer >= 16"),
        (dict(height=32.0), r"height must be an integer >= 16 .* got 32.0"),
        (dict(height=True), "height must be an integer"),
        (dict(height=100000, width=100000), r"exceeds max_pixels=16777216; .* max_pixels= a larger bound"),
        (dict(height=64, width=64, max_pixels=1024), "exceeds max_pixels=1024"),
        (dict(max_pixels=0), "max_pixels must be an integer >= 1"),
        (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
        (dict(num_inference_steps=2.5), "num_inference_steps must be an integer >= 1"),
        (dict(num_inference_steps=True), "num_inference_steps must be an integer >= 1"),
        (dict(seed=2**70), r"seed must be an integer between .* got 1180591620717411303424"),
        (dict(seed="x"), "seed must be an integer"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(seed=-(2**64)), "seed must be an integer"),
        (dict(prompt=[]), "prompt must be a string or a non-empty list of strings"),
        (dict(prompt=["a", 5]), "prompt must be a string or a non-empty list of strings"),
        (dict(negative_prompt=["a", "b"], cfg_scale=2.0), "negative_prompt has 2 entries; expected 1 or 1"),
        (dict(output_type="jpg"), "output_type must be"),
    ],
)
def test_bad_sizes_steps_seeds_and_prompts_are_named(pipe, kwargs, match):
    with pytest.raises(PipelineInputError, match=match):
        pipe(**{**CALL, **kwargs}, progress=False)


def test_zimage_sizes_name_their_multiple(zpipe):
    with pytest.raises(PipelineInputError, match=r"height=34 is not a multiple of 4; use 32 or 36 \(the VAE downsamples 2x and the DiT packs 2x2 patches\)"):  # fmt: skip
        zpipe(**{**CALL, "height": 34}, progress=False)
    with pytest.raises(PipelineInputError, match="exceeds max_pixels"):
        zpipe(**{**CALL, "height": 100000, "width": 100000}, progress=False)
    with pytest.raises(PipelineInputError, match="seed must be an integer"):
        zpipe(**{**CALL, "seed": 2**70}, progress=False)


def test_raising_max_pixels_allows_a_larger_image(pipe):
    out = pipe(**{**CALL, "height": 48}, max_pixels=48 * 32, output_type="np", progress=False)
    assert out.shape == (1, 48, 32, 3)


# -- unknown prompt words --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy():
    return Flux2ImagePipeline.from_pretrained(TOY, device="cpu", torch_dtype=torch.float32)


def test_unknown_prompt_words_are_named_once_per_prompt(toy, caplog):
    encoder = Flux2PromptEncoder(toy.tokenizer, toy.text_encoder)
    with caplog.at_level(logging.WARNING, logger="diffsynth_templates.pipelines.flux2_prompt"):
        encoder.tokenize(["a red fox in snow", "a red square"], 64)
        encoder.tokenize(["a red fox in snow"], 64)
    warnings = [r.getMessage() for r in caplog.records if "vocabulary" in r.getMessage()]
    assert warnings == [
        "prompt words not in the tokenizer's vocabulary (they become [UNK]): 'fox', 'in', 'snow' "
        "(prompt 'a red fox in snow')"
    ]


def test_zimage_encoder_names_unknown_words_too(toy, caplog):
    encoder = ZImagePromptEncoder(toy.tokenizer, toy.text_encoder)
    with caplog.at_level(logging.WARNING):
        encoder.tokenize(["a blue zebra"], 64)
    assert any("'zebra'" in r.getMessage() and "[UNK]" in r.getMessage() for r in caplog.records)


def test_known_words_and_byte_level_tokenizers_stay_silent(pipe, toy, caplog):
    with caplog.at_level(logging.WARNING):
        Flux2PromptEncoder(toy.tokenizer, toy.text_encoder).tokenize(["a red square"], 64)
    assert not [r for r in caplog.records if "vocabulary" in r.getMessage()]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_sequence_length="x"), "max_sequence_length must be an integer >= 1, got 'x'"),
        (dict(max_sequence_length=None), "max_sequence_length must be an integer >= 1, got None"),
        (dict(lora=[1]), r"lora \(from lora\) must be a dict of .* got list"),
        (dict(negative_lora="x", cfg_scale=2.0), r"from negative_lora\) must be a dict"),
        (
            dict(lora={"x.lora_A.weight": 5}),
            r"LoRA entry 'x.lora_A.weight' \(from lora\) must map a string key to a tensor",
        ),  # fmt: skip
        (dict(kv_cache="x"), r"kv_cache \(from kv_cache\) must be a dict"),
        (dict(callback_on_step_end=5), "callback_on_step_end must be a function"),
        (
            dict(input_image="photo.png"),
            "input_image must be a PIL image, a numpy array or a tensor, got str",
        ),
        (dict(input_image=np.zeros((4, 4, 3), dtype=object)), "input_image array has dtype object"),
        (dict(edit_image=[None]), r"edit_image\[0\] must be a PIL image"),
    ],
)
@pytest.mark.parametrize("family", ["flux2", "zimage"])
def test_wrong_argument_types_raise_our_errors_naming_them(pipe, zpipe, family, kwargs, match):
    if family == "zimage" and "edit_image" in kwargs:
        match = "ZImagePipeline takes no edit_image"  # refused before the images are looked at
    target = pipe if family == "flux2" else zpipe
    with pytest.raises(DiffSynthTemplatesError, match=match):
        target(**{**CALL, **kwargs}, progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(device="gpu"), "device must be like 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
        (dict(torch_dtype="bfloat16"), "torch_dtype must be a floating-point torch.dtype"),
        (dict(torch_dtype=torch.int8), "torch_dtype must be a floating-point torch.dtype"),
    ],
)
def test_bad_device_and_dtype_are_named_before_loading(kwargs, match):
    with pytest.raises(PipelineInputError, match=match):
        Flux2ImagePipeline.from_pretrained(TOY, **kwargs)


@pytest.mark.parametrize("shift", [math.nan, math.inf, 0, "3"])
def test_zimage_shift_must_be_finite_and_positive(zpipe, shift):
    from diffsynth_templates.pipelines.zimage_pipeline import ZImagePipeline

    with pytest.raises(NonFiniteError, match="shift must be a finite number"):
        ZImagePipeline(zpipe.dit, zpipe.vae, zpipe.text_encoder, zpipe.tokenizer, shift=shift)
