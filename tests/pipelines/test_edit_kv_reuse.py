"""Reference-image KV reuse: klein-9B-KV against diffusers' Flux2KleinKVPipeline on a tiny folder that
diffusers itself saved, and the opt-in approximate reuse (``reuse_edit_kv=True``) on ordinary klein."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates.pipelines.common import PipelineInputError
from diffsynth_templates.pipelines.defaults import recommended_defaults
from diffsynth_templates.pipelines.families import detect_family
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline

pytestmark = pytest.mark.usefixtures("one_thread")

H = W = 64
PROMPT = "a photo of a cat sitting on a windowsill"


@pytest.fixture(scope="module")
def kv_root(tiny_klein_root, tmp_path_factory):
    """The tiny klein weights saved by diffusers' Flux2KleinKVPipeline (its own official layout)."""
    import transformers
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinKVPipeline,
        Flux2Transformer2DModel,
    )

    root = tiny_klein_root
    pipe = Flux2KleinKVPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=AutoencoderKLFlux2.from_pretrained(root / "vae").eval(),
        text_encoder=transformers.Qwen3ForCausalLM.from_pretrained(root / "text_encoder").eval(),
        tokenizer=transformers.AutoTokenizer.from_pretrained(root / "tokenizer"),
        transformer=Flux2Transformer2DModel.from_pretrained(root / "transformer").eval(),
    )
    out = tmp_path_factory.mktemp("tiny-klein-kv") / "model"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def kv_pipe(kv_root):
    return Flux2ImagePipeline.from_pretrained(kv_root, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def pipe(tiny_klein_root):
    return Flux2ImagePipeline.from_pretrained(tiny_klein_root, torch_dtype=torch.float32, device="cpu")


def noise(batch=1, seed=0):
    return torch.randn(batch, 128, H // 16, W // 16, generator=torch.Generator().manual_seed(seed))


def photo(size=(96, 64), name="astronaut"):
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size)


def run(pipe, steps=4, cfg_scale=1.0, **kw):
    args = dict(prompt=PROMPT, height=H, width=W, latents=noise(), output_type="np", max_sequence_length=32)
    args.update(kw)
    return pipe(**args, num_inference_steps=steps, cfg_scale=cfg_scale, progress=False)


class TokenCounter:
    """The image-stream length of every DiT call (a forward pre-hook: the DiT itself is not replaced)."""

    def __init__(self, dit):
        self.lengths: list[int] = []
        self.handle = dit.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.lengths.append(kwargs["hidden_states"].shape[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# -- klein-9B-KV: exact, against diffusers ----------------------------------------------------------


def test_kv_folder_is_recognised(kv_root, kv_pipe, tmp_path):
    assert json.loads((kv_root / "model_index.json").read_text())["_class_name"] == "Flux2KleinKVPipeline"
    assert detect_family(kv_root).name == "flux2"
    assert kv_pipe.reference_kv_model
    defaults = recommended_defaults(kv_root)
    assert (defaults.num_inference_steps, defaults.cfg_scale) == (4, 1.0)
    saved = kv_pipe.save_pretrained(tmp_path / "again")
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "Flux2KleinKVPipeline"
    assert Flux2ImagePipeline.from_pretrained(saved, device="cpu").reference_kv_model


@pytest.mark.parametrize("references", [1, 2])
def test_kv_model_matches_diffusers(kv_root, kv_pipe, pipe, references):
    from diffusers import Flux2KleinKVPipeline

    edits = [photo(), photo((64, 80), "coffee")][:references]
    reference = Flux2KleinKVPipeline.from_pretrained(kv_root)
    with TokenCounter(kv_pipe.dit) as counter:
        ours = run(kv_pipe, edit_image=edits)
    with torch.no_grad():
        theirs = reference(
            image=edits, prompt=PROMPT, height=H, width=W, num_inference_steps=4, latents=noise(),
            output_type="np", max_sequence_length=32,
        ).images  # fmt: skip
    assert ours.shape == theirs.shape == (1, H, W, 3)
    assert np.abs(ours - theirs).max() <= 1e-3
    # every step ran the image tokens only: the references' K/V were computed once, before the loop
    assert counter.lengths == [(H // 16) * (W // 16)] * 4
    # and the KV model's reference attention is not the ordinary klein's (the test can tell them apart:
    # on these tiny random weights the latents differ by ~1e-3, float error is ~1e-6)
    kv_latents = run(kv_pipe, edit_image=edits, output_type="latent")
    assert (kv_latents - run(pipe, edit_image=edits, output_type="latent")).abs().max() > 1e-4


def test_kv_model_without_reference_is_plain_klein(kv_pipe, pipe):
    # the same weights, re-saved by diffusers: equal up to float rounding of the reloaded components
    assert np.abs(run(kv_pipe) - run(pipe)).max() <= 1e-5


@pytest.mark.parametrize("strength", [None, 0.5])
def test_kv_model_with_templates_batches_cfg_sides_exactly(kv_pipe, strength):
    """The reference K/V join a one-sided template cache (padded, masked CFG batch; with a strength,
    a logit bias) exactly as in two separate passes."""
    from diffsynth_templates.pipelines.kv_schedule import with_log_strength

    cfg = kv_pipe.dit.config
    g = torch.Generator().manual_seed(3)
    kv = {"double_0": tuple(torch.randn(1, 5, cfg.num_heads, cfg.head_dim, generator=g) for _ in "kv")}
    kv = kv if strength is None else with_log_strength(kv, strength)
    kw = dict(cfg_scale=3.0, edit_image=[photo()], kv_cache=kv, max_sequence_length=32)
    batched = run(kv_pipe, **kw)
    kv_pipe.cfg_batching = False
    try:
        separate = run(kv_pipe, **kw)
    finally:
        kv_pipe.cfg_batching = True
    assert np.abs(batched - separate).max() <= 1e-5
    without = run(kv_pipe, cfg_scale=3.0, edit_image=[photo()])
    assert np.abs(batched - without).max() > 1e-4  # the template's tokens were really attended to


# -- reuse_edit_kv on ordinary klein: opt-in, approximate -------------------------------------------


def test_reuse_is_off_by_default(pipe):
    edits = [photo()]
    with TokenCounter(pipe.dit) as counter:
        default = run(pipe, edit_image=edits)
    assert np.array_equal(default, run(pipe, edit_image=edits, reuse_edit_kv=False))
    reference_tokens = (64 // 16) * (96 // 16)
    assert counter.lengths == [(H // 16) * (W // 16) + reference_tokens] * 4


def test_reuse_records_on_the_first_step_and_skips_the_tokens_after(pipe):
    edits = [photo()]
    n_img, n_ref = (H // 16) * (W // 16), (64 // 16) * (96 // 16)
    with TokenCounter(pipe.dit) as counter:
        reused = run(pipe, edit_image=edits, reuse_edit_kv=True)
    assert counter.lengths == [n_img + n_ref, n_img, n_img, n_img]
    exact = run(pipe, edit_image=edits)
    assert 0 < np.abs(reused - exact).max()  # approximate: later steps see step 0's reference K/V
    assert psnr(reused, exact) > 25
    # one step: the recording is never used, the result is the exact one, bit for bit
    one_step = run(pipe, steps=1, edit_image=edits, reuse_edit_kv=True)
    assert np.array_equal(one_step, run(pipe, steps=1, edit_image=edits))


@pytest.mark.parametrize("template", [False, True])
def test_reuse_per_cfg_side_batched_equals_two_passes(pipe, template):
    """Each CFG side records its own reference K/V (they attend to their own prompt); batched and
    two-pass runs agree, with or without a one-sided template cache."""
    cfg = pipe.dit.config
    g = torch.Generator().manual_seed(4)
    kv = {"single_1": tuple(torch.randn(1, 3, cfg.num_heads, cfg.head_dim, generator=g) for _ in "kv")}
    kw = dict(cfg_scale=4.0, edit_image=[photo()], reuse_edit_kv=True, kv_cache=kv if template else None)
    batched = run(pipe, **kw)
    pipe.cfg_batching = False
    try:
        separate = run(pipe, **kw)
    finally:
        pipe.cfg_batching = True
    assert np.abs(batched - separate).max() <= 1e-5


def test_reuse_without_reference_images_changes_nothing(pipe, pipes):
    assert np.array_equal(run(pipe, reuse_edit_kv=True), run(pipe))
    zimage = pipes["zimage"]
    args = dict(
        prompt="x", height=32, width=32, num_inference_steps=2, seed=1, output_type="np", progress=False
    )
    assert np.array_equal(zimage(**args, reuse_edit_kv=True), zimage(**args))


def test_reuse_flag_must_be_a_bool(pipe):
    with pytest.raises(PipelineInputError, match="reuse_edit_kv must be True or False, got 'yes'"):
        run(pipe, edit_image=[photo()], reuse_edit_kv="yes")


def test_kv_model_reference_tokens_take_no_template_bias(kv_pipe):
    """A template's log-strength bias covers its own tokens only: at strength 1 (bias 0 on its tokens)
    the image equals the one without a bias entry, so the reference tokens got bias 0, not more."""
    from diffsynth_templates.pipelines.kv_schedule import with_log_strength

    cfg = kv_pipe.dit.config
    g = torch.Generator().manual_seed(5)
    kv = {"single_0": tuple(torch.randn(1, 4, cfg.num_heads, cfg.head_dim, generator=g) for _ in "kv")}
    plain = run(kv_pipe, edit_image=[photo()], kv_cache=kv, output_type="latent")
    biased = run(kv_pipe, edit_image=[photo()], kv_cache=with_log_strength(kv, 1.0), output_type="latent")
    assert (plain - biased).abs().max() <= 1e-6
