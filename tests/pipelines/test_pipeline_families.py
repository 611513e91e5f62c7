"""The pipeline behaviour both backbones must keep, one test body each, parametrized over the families
(ids ``flux2`` / ``zimage``), on the tiny official-layout folders (tests/tiny_klein.py,
tests/tiny_zimage.py): batched CFG equals two passes, one DiT pass per step without CFG, template KV
and extra text tokens reach the DiT, inpainting (pixels and latents), img2img strength, CFG sides with different caches and LoRAs,
seeds, batches and output types.
What only one pipeline has (parity with its diffusers pipeline, FLUX.2 edit images and offload, the
Z-Image variants, schedule and chat prompt) stays in tests/pipelines/test_{flux2,zimage}_pipeline.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates.pipelines.families import FAMILIES

PROMPT = "a photo of a cat sitting on a windowsill"
STEPS = 3


@dataclass(frozen=True)
class PipeCase:
    """How each family's pipeline file drives its tiny pipeline (sizes and keyword defaults kept as
    they were there, so each check runs on the same call as before)."""

    family: str
    root_fixture: str
    size: int  # height = width
    latent_shape: Callable[[int], tuple[int, ...]]  # batch -> the initial noise's shape
    defaults: dict  # the keywords every run() passes
    short: dict  # keywords of the quick checks
    cfg: dict  # keywords of the CFG checks (a negative prompt)
    kv_block: str  # the block the "reaches the DiT" check feeds
    lora_module: str  # a Linear of the DiT the runtime-LoRA checks feed


CASES = {
    "flux2": PipeCase(
        "flux2",
        "tiny_klein_root",
        64,
        lambda batch: (batch, 128, 64 // 16, 64 // 16),
        defaults={},
        short=dict(max_sequence_length=16),
        cfg=dict(max_sequence_length=32, negative_prompt="blurry"),
        kv_block="single_0",
        lora_module="transformer_blocks.0.attn.to_q",
    ),
    "zimage": PipeCase(
        "zimage",
        "tiny_zimage_root",
        32,
        lambda batch: (batch, 16, 32 // 2, 32 // 2),
        # a longer negative caption than the prompt: a ragged CFG batch
        defaults=dict(
            negative_prompt="a red car parked in the street at night, blurry",
            cfg_scale=1.0,
            max_sequence_length=64,
        ),
        short={},
        cfg={},
        kv_block="block_1",
        lora_module="layers.0.attention.to_q",
    ),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def case(request) -> PipeCase:
    return CASES[request.param]


@pytest.fixture(scope="module")
def pipe(request, case):
    root = request.getfixturevalue(case.root_fixture)
    cls = FAMILIES[case.family].pipeline_class()
    return cls.from_pretrained(root, torch_dtype=torch.float32, device="cpu")


def noise(case: PipeCase, batch=1, seed=0):
    return torch.randn(*case.latent_shape(batch), generator=torch.Generator().manual_seed(seed))


def run(case: PipeCase, pipe, **kw):
    args = dict(
        prompt=PROMPT,
        height=case.size,
        width=case.size,
        num_inference_steps=STEPS,
        latents=noise(case),
        output_type="np",
        **case.defaults,
    )
    return pipe(**{**args, **kw}, progress=False)


def photo(size: int):
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()).convert("RGB").resize((size, size))


def two_passes(pipe, monkeypatch):
    """Make the pipeline run the CFG sides as two DiT calls (its public switch)."""
    monkeypatch.setattr(pipe, "cfg_batching", False)


def dit_batches(pipe, calls: list):
    """Record the batch of every DiT call (a tensor's rows, or Z-Image's list of samples)."""
    return pipe.dit.register_forward_hook(lambda m, i, o: calls.append(len(o)))


def random_kv(dit, length: int, seed: int, blocks=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        name: tuple(torch.randn(1, length, s.heads, s.head_dim, generator=g) for _ in range(2))
        for name, s in dit.kv_block_specs.items()
        if blocks is None or name in blocks
    }


# --- CFG batching ---------------------------------------------------------------------------------


def test_batched_cfg_equals_two_passes(case, pipe, monkeypatch):
    batched = run(case, pipe, cfg_scale=3.0, **case.cfg)
    two_passes(pipe, monkeypatch)
    sequential = run(case, pipe, cfg_scale=3.0, **case.cfg)
    assert np.abs(batched - sequential).max() <= 1e-5


def test_cfg_one_runs_one_dit_pass_per_step(case, pipe):
    calls = []
    handle = dit_batches(pipe, calls)
    try:
        run(case, pipe, cfg_scale=1.0, **case.short)
        assert calls == [1] * STEPS
        calls.clear()
        run(case, pipe, cfg_scale=2.0, **case.short)
        assert calls == [2] * STEPS  # both sides in one batched call
    finally:
        handle.remove()


@pytest.mark.parametrize("negative", ["none", "shorter", "other_blocks", "one_block_much_shorter"])
def test_cfg_sides_with_different_kv_stay_batched_and_exact(case, pipe, monkeypatch, negative):
    """Templates usually feed only the positive side: the sides are still one DiT call (the shorter
    side's padding is masked, on top of Z-Image's ragged-caption mask) and equal two separate passes."""
    first = list(pipe.dit.kv_block_specs)[:1]
    kv = random_kv(pipe.dit, 6 if negative == "one_block_much_shorter" else 7, 0)
    negative_kv = {
        "none": None,
        "shorter": random_kv(pipe.dit, 3, 1),
        "other_blocks": random_kv(pipe.dit, 5, 2, first),
        "one_block_much_shorter": random_kv(pipe.dit, 2, 3, first),
    }[negative]
    args = dict(cfg_scale=3.0, **case.cfg, kv_cache=kv, negative_kv_cache=negative_kv)
    calls = []
    handle = dit_batches(pipe, calls)
    try:
        batched = run(case, pipe, **args)
    finally:
        handle.remove()
    assert calls == [2] * STEPS
    two_passes(pipe, monkeypatch)
    assert np.abs(batched - run(case, pipe, **args)).max() <= 1e-5
    assert np.abs(batched - run(case, pipe, **{**args, "kv_cache": None})).max() > 1e-3  # the KV matters


# --- seeds, batches, output types -----------------------------------------------------------------


def test_seed_reproducible_batch_and_pil(case, pipe):
    a = run(case, pipe, latents=None, seed=7, **case.short)
    assert np.array_equal(a, run(case, pipe, latents=None, seed=7, **case.short))
    assert np.abs(a - run(case, pipe, latents=None, seed=8, **case.short)).max() > 1e-3
    assert a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    two = run(case, pipe, prompt=[PROMPT, "a red car"], latents=noise(case, 2), **case.short)
    assert two.shape == (2, case.size, case.size, 3) and np.abs(two[0] - two[1]).max() > 1e-3
    assert np.abs(two[0] - run(case, pipe, **case.short)[0]).max() <= 1e-5  # a batch changes no sample
    images = run(case, pipe, output_type="pil", **case.short)
    assert isinstance(images[0], Image.Image) and images[0].size == (case.size, case.size)


# --- template inputs ------------------------------------------------------------------------------


def test_runtime_lora_per_side_batched_equals_two_passes(case, pipe, monkeypatch):
    layer = pipe.dit.get_submodule(case.lora_module)
    g = torch.Generator().manual_seed(5)

    def lora(scale):
        return {
            f"{case.lora_module}.lora_A.weight": torch.randn(2, layer.in_features, generator=g) * scale,
            f"{case.lora_module}.lora_B.weight": torch.randn(layer.out_features, 2, generator=g) * scale,
        }

    args = dict(cfg_scale=3.0, **case.cfg)
    base = run(case, pipe, **args)
    pos, neg = lora(0.5), lora(0.25)
    calls = []
    handle = dit_batches(pipe, calls)
    try:
        batched = run(case, pipe, **args, lora=pos, negative_lora=neg)
    finally:
        handle.remove()
    assert calls == [2] * STEPS  # different LoRAs per side, still one DiT call per step
    assert np.abs(batched - base).max() > 1e-4
    assert np.array_equal(run(case, pipe, **args), base)  # the branches are removed after the call
    two_passes(pipe, monkeypatch)
    assert np.abs(run(case, pipe, **args, lora=pos, negative_lora=neg) - batched).max() <= 1e-5


def test_kv_cache_and_extra_text_embedding_reach_the_dit(case, pipe):
    short = dict(cfg_scale=1.0, **case.short)
    base = run(case, pipe, **short)
    spec = pipe.dit.kv_block_specs[case.kv_block]
    g = torch.Generator().manual_seed(0)
    kv = {case.kv_block: (torch.randn(1, 5, spec.heads, spec.head_dim, generator=g),) * 2}
    assert np.abs(run(case, pipe, **short, kv_cache=kv) - base).max() > 1e-4
    empty = {case.kv_block: (torch.zeros(1, 0, spec.heads, spec.head_dim),) * 2}
    assert np.array_equal(run(case, pipe, **short, kv_cache=empty), base)
    text_dim = FAMILIES[case.family].kv_layout(pipe.dit.config).text_dim
    extra = torch.randn(1, 3, text_dim, generator=g)
    assert np.abs(run(case, pipe, **short, extra_text_embedding=extra) - base).max() > 1e-4
    # the negative side's cache matters only with CFG
    with_cfg = run(case, pipe, **{**short, "cfg_scale": 2.0})
    assert (
        np.abs(run(case, pipe, **{**short, "cfg_scale": 2.0}, negative_kv_cache=kv) - with_cfg).max() > 1e-4
    )
    assert np.array_equal(run(case, pipe, **short, negative_kv_cache=kv), base)


# --- image inputs ---------------------------------------------------------------------------------


def test_inpaint_keeps_pixels_outside_the_mask(case, pipe):
    size = case.size
    image = photo(size)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    out = run(case, pipe, input_image=image, inpaint_mask=Image.fromarray(mask), cfg_scale=2.0, **case.short)
    pixels = np.asarray(image, dtype=np.float32) / 255  # the input's own pixels, not its VAE round trip
    outside = mask == 0
    assert np.abs(out[0][outside] - pixels[outside]).max() <= 1e-6
    assert np.abs(out[0][~outside] - pixels[~outside]).mean() > 1e-3  # the masked region was regenerated


def test_inpaint_latents_land_on_the_input(case, pipe):
    """Outside the mask the sampled latents are the input's own (the loop steers onto them)."""
    size = case.size
    image = photo(size)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2 :] = 255  # the right half regenerates (on a token boundary for both families)
    final = {}
    run(
        case, pipe, input_image=image, inpaint_mask=mask, cfg_scale=1.0, **case.short,
        callback_on_step_end=lambda p, i, t, kw: final.update(x=kw["latents"]),
    )  # fmt: skip
    clean = pipe.encode_image(image, size, size)
    latents = pipe._untokens(final["x"], clean.shape[-2], clean.shape[-1])  # the loop's layout -> latents
    half = clean.shape[-1] // 2
    assert (latents[..., :half] - clean[..., :half]).abs().max() <= 1e-5
    assert (latents[..., half:] - clean[..., half:]).abs().max() > 1e-2


def test_img2img_strength_controls_change(case, pipe):
    image = photo(case.size)
    ref = pipe.decode_latents(pipe.encode_image(image, case.size, case.size)).float()
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    weak = run(case, pipe, input_image=image, denoising_strength=0.2, cfg_scale=1.0, **case.short)
    strong = run(case, pipe, input_image=image, denoising_strength=1.0, cfg_scale=1.0, **case.short)
    assert np.abs(weak - ref).mean() < np.abs(strong - ref).mean()
