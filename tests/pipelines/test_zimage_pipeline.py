"""ZImagePipeline end to end against diffusers' ZImagePipeline on a tiny official-layout folder.

The folder is written the way the official Z-Image repos are: transformer/ (ZImageTransformer2DModel,
sharded), vae/ (AutoencoderKL, 16 latent channels, scaling and shift factors, no quant convs),
text_encoder/ (Qwen3ForCausalLM), tokenizer/ (tokenizer.json with Qwen's special tokens and a
tokenizer_config.json carrying the chat template) and scheduler/ (static shift 3.0). Its name
contains "turbo", so the pipeline picks the Turbo defaults.
"""

from __future__ import annotations

import json
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
from tests.pipelines.test_flux2_prompt import QWEN3_CHAT_TEMPLATE, tiny_qwen_tokenizer

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

H = W = 32  # the tiny VAE downsamples by 2: latents 16 x 16, 8 x 8 = 64 image tokens
LATENT = H // 2
PROMPT = "a photo of a cat sitting on a windowsill"
NEGATIVE = "a red car parked in the street at night, blurry"  # a longer caption: a ragged CFG batch
STEPS = 3
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}


def _randomize(model, scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) * scale)


def build_tiny_zimage(root: Path) -> Path:
    torch.manual_seed(0)
    tok = tiny_qwen_tokenizer()
    (root / "tokenizer").mkdir(parents=True)
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "model_max_length": 131072,
        "chat_template": QWEN3_CHAT_TEMPLATE,
    }
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    text_encoder = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            vocab_size=tok.get_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
        )
    ).eval()
    _randomize(text_encoder, 0.2)
    text_encoder.save_pretrained(root / "text_encoder", max_shard_size="20KB")
    transformer = diffusers.ZImageTransformer2DModel(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=32,
        axes_dims=[8, 12, 12],
        axes_lens=[256, 64, 64],
    ).eval()
    _randomize(transformer, 0.05)
    transformer.save_pretrained(root / "transformer", max_shard_size="50KB")
    diffusers.AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).save_pretrained(root / "vae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return build_tiny_zimage(tmp_path_factory.mktemp("zimage") / "Tiny-Z-Image-Turbo")


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


# --- defaults and batching -------------------------------------------------------------------------


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


def test_cfg_runs_both_sides_in_one_call(pipe):
    calls = []
    handle = pipe.dit.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    try:
        run(pipe, cfg_scale=2.0)
    finally:
        handle.remove()
    assert calls == [2] * STEPS


def test_batched_cfg_equals_two_passes(pipe, monkeypatch):
    import diffsynth_templates.pipelines.zimage_pipeline as mod

    batched = run(pipe, cfg_scale=3.0)
    monkeypatch.setattr(mod, "_batch_sides", lambda *args: None)
    assert np.abs(batched - run(pipe, cfg_scale=3.0)).max() <= 1e-5


def test_seed_reproducible_batch_and_pil(pipe):
    a = run(pipe, latents=None, seed=7)
    assert np.array_equal(a, run(pipe, latents=None, seed=7))
    assert np.abs(a - run(pipe, latents=None, seed=8)).max() > 1e-3
    two = run(pipe, prompt=[PROMPT, "a red car"], latents=noise(2))
    assert two.shape == (2, H, W, 3) and np.abs(two[0] - two[1]).max() > 1e-3
    assert np.abs(two[0] - run(pipe)[0]).max() <= 1e-5  # a ragged prompt batch changes no sample
    images = run(pipe, output_type="pil")
    assert isinstance(images[0], Image.Image) and images[0].size == (W, H)


# --- template inputs --------------------------------------------------------------------------------


def test_kv_cache_and_extra_text_embedding_reach_the_dit(pipe):
    base = run(pipe)
    spec = pipe.dit.kv_block_specs["block_1"]
    g = torch.Generator().manual_seed(0)
    kv = {"block_1": (torch.randn(1, 5, spec.heads, spec.head_dim, generator=g),) * 2}
    assert np.abs(run(pipe, kv_cache=kv) - base).max() > 1e-4
    empty = {"block_1": (torch.zeros(1, 0, spec.heads, spec.head_dim),) * 2}
    assert np.array_equal(run(pipe, kv_cache=empty), base)
    extra = torch.randn(1, 3, pipe.dit.config.cap_feat_dim, generator=g)
    assert np.abs(run(pipe, extra_text_embedding=extra) - base).max() > 1e-4
    # the negative side's cache matters only with CFG; unbatchable caches fall back to two passes
    with_cfg = run(pipe, cfg_scale=2.0)
    assert np.abs(run(pipe, cfg_scale=2.0, negative_kv_cache=kv) - with_cfg).max() > 1e-4
    assert np.array_equal(run(pipe, negative_kv_cache=kv), base)


def test_runtime_lora_and_per_side_loras(pipe, monkeypatch):
    import diffsynth_templates.pipelines.zimage_pipeline as mod

    g = torch.Generator().manual_seed(0)
    module = "layers.0.attention.to_q"

    def lora(scale):
        return {
            f"{module}.lora_A.weight": torch.randn(2, 64, generator=g) * scale,
            f"{module}.lora_B.weight": torch.randn(64, 2, generator=g) * scale,
        }

    base = run(pipe, cfg_scale=2.0)
    pos, neg = lora(0.5), lora(0.5)
    batched = run(pipe, cfg_scale=2.0, lora=pos, negative_lora=neg)
    assert np.abs(batched - base).max() > 1e-4
    assert np.array_equal(run(pipe, cfg_scale=2.0), base)  # removed after the call
    monkeypatch.setattr(mod, "_batch_sides", lambda *args: None)
    assert np.abs(run(pipe, cfg_scale=2.0, lora=pos, negative_lora=neg) - batched).max() <= 1e-5


def test_inpaint_keeps_pixels_outside_the_mask(pipe):
    image = photo()
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[8:24, 8:24] = 255
    out = run(pipe, input_image=image, inpaint_mask=Image.fromarray(mask), cfg_scale=2.0)
    pixels = np.asarray(image, dtype=np.float32) / 255  # the input's own pixels, not its VAE round trip
    outside = mask == 0
    assert np.abs(out[0][outside] - pixels[outside]).max() <= 1e-6
    assert np.abs(out[0][~outside] - pixels[~outside]).mean() > 1e-3


def test_inpaint_latents_land_on_the_input(pipe):
    image = photo()
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[:, W // 2 :] = 255  # the right half regenerates
    final = run(pipe, input_image=image, inpaint_mask=mask, output_type="latent")
    clean = pipe.encode_image(image, H, W)
    half = LATENT // 2
    assert (final[..., :half] - clean[..., :half]).abs().max() <= 1e-5
    assert (final[..., half:] - clean[..., half:]).abs().max() > 1e-2


def test_img2img_strength_controls_change(pipe):
    image = photo()
    ref = (pipe.decode_latents(pipe.encode_image(image, H, W)).float() / 2 + 0.5).clamp(0, 1)
    ref = ref.permute(0, 2, 3, 1).numpy()
    weak = run(pipe, input_image=image, denoising_strength=0.2)
    strong = run(pipe, input_image=image, denoising_strength=1.0)
    assert np.abs(weak - ref).mean() < np.abs(strong - ref).mean()


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


def test_cfg_sides_with_different_kv_stay_batched_and_exact(pipe, monkeypatch):
    """Template KV on the positive side only, a shorter cache on the negative side of one block: one
    batched DiT call per step (padding masked, on top of the ragged-caption mask), equal to two passes."""
    import diffsynth_templates.pipelines.zimage_pipeline as mod

    g = torch.Generator().manual_seed(0)
    specs = pipe.dit.kv_block_specs
    kv = {
        n: tuple(torch.randn(1, 6, s.heads, s.head_dim, generator=g) for _ in range(2))
        for n, s in specs.items()
    }
    first = next(iter(specs))
    negative = {first: tuple(torch.randn(1, 2, specs[first].heads, specs[first].head_dim, generator=g) for _ in range(2))}  # fmt: skip
    calls = []
    handle = pipe.dit.register_forward_hook(lambda m, i, o: calls.append(len(o)))
    try:
        batched = run(pipe, cfg_scale=3.0, kv_cache=kv, negative_kv_cache=negative)
    finally:
        handle.remove()
    assert calls == [2] * STEPS
    monkeypatch.setattr(mod, "_batch_sides", lambda *args: None)
    assert np.abs(batched - run(pipe, cfg_scale=3.0, kv_cache=kv, negative_kv_cache=negative)).max() <= 1e-5
