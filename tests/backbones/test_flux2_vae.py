"""Flux2VAE: parity with diffusers' AutoencoderKLFlux2 and the klein pipeline's latent path, loading
of official-layout checkpoints, tiled decoding, and input validation."""

from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffsynth_templates.backbones.flux2_vae import (
    Flux2VAE,
    Flux2VAEConfig,
    blend_ramp,
    tile_starts,
)

logger = logging.getLogger(__name__)

# Four levels like the official VAE (so the downsample factor is 8), but narrow.
TINY = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random diffusers VAE with non-trivial BN statistics, saved sharded and unsharded."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    ref = AutoencoderKLFlux2(**TINY).eval()
    with torch.no_grad():  # the default init is mean 0 / var 1, which would hide a mix-up
        ref.bn.running_mean.copy_(torch.randn(128) * 0.7)
        ref.bn.running_var.copy_(torch.rand(128) * 3 + 0.02)
        ref.bn.num_batches_tracked.fill_(1234)
    sharded = tmp_path_factory.mktemp("vae_sharded")
    ref.save_pretrained(sharded, max_shard_size="200KB")
    single = tmp_path_factory.mktemp("vae_single")
    ref.save_pretrained(single)
    return ref, sharded, single


@pytest.fixture(scope="module")
def model(reference):
    return Flux2VAE.from_pretrained(reference[1])


def images(batch=2, height=64, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1


def pipeline_bn(vae):
    """The klein pipeline's BN mean/std, computed as in Flux2KleinPipeline._encode_vae_image."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


# --- config and checkpoint layout ----------------------------------------------------------------


def test_default_config_matches_diffusers_defaults():
    from diffusers import AutoencoderKLFlux2

    params = inspect.signature(AutoencoderKLFlux2.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    assert Flux2VAEConfig.from_dict(defaults) == Flux2VAEConfig()
    assert Flux2VAEConfig().downsample_factor == 8 and Flux2VAEConfig().dit_channels == 128


def test_full_size_layout_matches_official_keys_and_shapes():
    """The official-size model, built on meta, has exactly diffusers' parameter names and shapes."""
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        ref = AutoencoderKLFlux2()
        ours = Flux2VAE(Flux2VAEConfig.from_dict(dict(ref.config)))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "bn.num_batches_tracked"}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want


def test_config_reads_saved_json(reference):
    _, folder, _ = reference
    cfg = Flux2VAEConfig.from_dict(json.loads((folder / "config.json").read_text()))
    assert cfg.block_out_channels == TINY["block_out_channels"]
    assert cfg.patch_size == (2, 2) and cfg.batch_norm_eps == 1e-4
    assert cfg.extra.get("sample_size") == 1024  # known but unused keys are kept, not lost


@pytest.mark.parametrize(
    "override, needle",
    [
        (dict(norm_num_groups=12), "norm_num_groups=12"),
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(act_fn="gelu"), "'gelu'"),
        (dict(down_block_types=["AttnDownEncoderBlock2D"] * 4), "AttnDownEncoderBlock2D"),
        (dict(decoder_block_out_channels=[16, 32]), "decoder_block_out_channels"),
        (dict(_class_name="AutoencoderKL"), "'AutoencoderKL'"),
        (dict(batch_norm_eps=0.0), "batch_norm_eps"),
    ],
)
def test_bad_config_raises_naming_the_value(override, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        Flux2VAEConfig.from_dict({**TINY, **override})


def test_checkpoint_is_sharded(reference):
    _, sharded, single = reference
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(single.glob("*.safetensors"))) == 1


def test_state_dict_names_are_the_checkpoint_names(reference, model):
    _, _, single = reference
    ckpt = load_file(str(single / "diffusion_pytorch_model.safetensors"))
    assert set(model.state_dict()) == set(ckpt) - {"bn.num_batches_tracked"}
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ckpt[name], rtol=0, atol=0)


def test_loads_checkpoint_without_the_bn_counter(reference, tmp_path):
    """Whether or not a checkpoint stores bn.num_batches_tracked, it loads."""
    _, _, single = reference
    ckpt = load_file(str(single / "diffusion_pytorch_model.safetensors"))
    del ckpt["bn.num_batches_tracked"]
    save_file(ckpt, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((single / "config.json").read_text())
    vae = Flux2VAE.from_pretrained(tmp_path)
    torch.testing.assert_close(vae.bn.running_var, ckpt["bn.running_var"], rtol=0, atol=0)


# --- parity with diffusers (fp32) ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_encode_mode_matches_diffusers(reference, layout):
    ref, sharded, single = reference
    vae = Flux2VAE.from_pretrained(sharded if layout == "sharded" else single)
    x = images()
    with torch.no_grad():
        want = ref.encode(x).latent_dist.mode()  # what retrieve_latents(..., sample_mode="argmax") returns
        got = vae.encode(x)
    diff = (got - want).abs().max().item()
    logger.info("encode max abs diff (%s): %.3g", layout, diff)
    assert got.shape == (2, 32, 8, 6)
    assert diff <= 1e-4


@pytest.mark.parametrize("layout", ["sharded", "single"])
def test_decode_matches_diffusers(reference, layout):
    ref, sharded, single = reference
    vae = Flux2VAE.from_pretrained(sharded if layout == "sharded" else single)
    z = torch.randn(2, 32, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = vae.decode(z)
    diff = (got - want).abs().max().item()
    logger.info("decode max abs diff (%s): %.3g", layout, diff)
    assert got.shape == (2, 3, 64, 48)
    assert diff <= 1e-4


def test_dit_latent_path_matches_klein_pipeline(reference, model):
    """patchify + normalize and denormalize + unpatchify against Flux2KleinPipeline's own helpers."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    ref, _, _ = reference
    z = torch.randn(2, 32, 8, 6, generator=torch.Generator().manual_seed(2)) * 2
    mean, std = pipeline_bn(ref)

    want = (Flux2KleinPipeline._patchify_latents(z) - mean) / std  # _encode_vae_image
    got = model.normalize(model.patchify(z))
    assert got.shape == (2, 128, 4, 3)
    assert (got - want).abs().max().item() <= 1e-5

    dit = torch.randn(2, 128, 4, 3, generator=torch.Generator().manual_seed(3))
    want_back = Flux2KleinPipeline._unpatchify_latents(dit * std + mean)  # end of __call__
    got_back = model.unpatchify(model.denormalize(dit))
    assert (got_back - want_back).abs().max().item() <= 1e-5

    torch.testing.assert_close(model.unpatchify(model.patchify(z)), z, rtol=0, atol=0)


def test_encode_to_dit_and_decode_from_dit_match_pipeline(reference, model):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    ref, _, _ = reference
    x = images(height=64, width=48)
    mean, std = pipeline_bn(ref)
    with torch.no_grad():
        want = (Flux2KleinPipeline._patchify_latents(ref.encode(x).latent_dist.mode()) - mean) / std
        got = model.encode_to_dit(x)
        assert got.shape == (2, 128, 4, 3)
        assert (got - want).abs().max().item() <= 1e-4  # encoder rounding, divided by std

        want_img = ref.decode(Flux2KleinPipeline._unpatchify_latents(got * std + mean)).sample
        got_img = model.decode_from_dit(got)
    assert got_img.shape == x.shape
    assert (got_img - want_img).abs().max().item() <= 1e-4


def test_bn_stats_stay_fp32_in_bf16_and_normalize_rounds_once(reference):
    """In bf16, normalize is the float32 result rounded once; diffusers' bf16 path is never better."""
    ref, folder, _ = reference
    vae = Flux2VAE.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert vae.dtype == torch.bfloat16
    assert vae.bn.running_mean.dtype == vae.bn.running_var.dtype == torch.float32

    x = torch.randn(1, 128, 16, 16, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    mean, std = pipeline_bn(ref)
    exact = (x.float() - mean) / std
    ours = vae.normalize(x)
    assert ours.dtype == torch.bfloat16
    err = (ours.float() - exact).abs()
    assert bool((err <= exact.abs() * 2**-8 + 1e-30).all())  # within half a bf16 ulp (8-bit mantissa)

    # diffusers with the VAE in bf16: statistics rounded to bf16, arithmetic in bf16
    mean16 = ref.bn.running_mean.to(torch.bfloat16).view(1, -1, 1, 1)
    std16 = torch.sqrt(ref.bn.running_var.to(torch.bfloat16).view(1, -1, 1, 1) + 1e-4)
    theirs_err = (((x - mean16) / std16).float() - exact).abs()
    logger.info("bf16 normalize max err: ours %.3g, diffusers-style %.3g", err.max(), theirs_err.max())
    assert err.max() <= theirs_err.max()


# --- tiled decode --------------------------------------------------------------------------------


def test_tile_starts_cover_and_overlap():
    for length, tile, overlap in [(24, 8, 4), (20, 8, 2), (33, 16, 4), (16, 16, 4), (5, 8, 2)]:
        starts = tile_starts(length, tile, overlap)
        size = min(tile, length)
        assert starts[0] == 0 and starts[-1] + size == length
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= overlap  # every seam has at least the asked overlap


def test_blend_ramps_sum_to_one_in_overlaps():
    a = blend_ramp(0, 64, None, 40)
    b = blend_ramp(40, 64, 64, None)
    torch.testing.assert_close(a[40:] + b[:24], torch.ones(24))
    assert bool((a > 0).all()) and a[0] == 1 and b[-1] == 1


def test_tiled_decode_blending_is_exact_for_a_local_decoder(model, monkeypatch):
    """Swap the network for a pointwise map: then tiling and blending must reproduce it exactly."""
    f = model.config.downsample_factor

    def pointwise(z):
        return F.interpolate(torch.tanh(z[:, :3] + z[:, 3:6] ** 2), scale_factor=f, mode="nearest")

    monkeypatch.setattr(model, "_decode_tile", pointwise)
    z = torch.randn(1, 32, 21, 30, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        model.decode(z, tile_size=8, tile_overlap=3), pointwise(z), rtol=1e-6, atol=1e-6
    )


def test_tiled_decode_decodes_each_tile_separately_and_stays_close(reference, model):
    """Real network: each decoder call sees one tile; the blend is at least as close as diffusers' tiling."""
    ref, _, _ = reference
    with torch.no_grad():
        z = model.encode(images(batch=1, height=256, width=192, seed=6))  # latents [1, 32, 32, 24]
        full = model.decode(z)

        seen = []
        hook = model.decoder.register_forward_hook(
            lambda mod, args, out: seen.append(tuple(args[0].shape[-2:]))
        )
        try:
            tiled = model.decode(z, tile_size=16, tile_overlap=4)
        finally:
            hook.remove()

        ref.enable_tiling()  # same tile (16 latents) and overlap (25% = 4 latents) in diffusers
        ref.tile_latent_min_size, ref.tile_sample_min_size = 16, 128
        try:
            theirs = ref.decode(z).sample
        finally:
            ref.disable_tiling()

    rows, cols = tile_starts(32, 16, 4), tile_starts(24, 16, 4)
    assert len(seen) == len(rows) * len(cols) == 6
    assert all(s == (16, 16) for s in seen)
    assert tiled.shape == full.shape == (1, 3, 256, 192)

    ours_err, theirs_err = (tiled - full).abs(), (theirs - full).abs()
    logger.info(
        "tiled vs untiled, tiny random VAE: ours max %.3g mean %.3g; diffusers tiling max %.3g mean %.3g",
        ours_err.max(), ours_err.mean(), theirs_err.max(), theirs_err.mean(),
    )  # fmt: skip
    # A random GroupNorm network is not local (per-tile statistics), so tiles differ; bound the error
    # by the reference implementation's own tiling error and by a fraction of the signal.
    assert ours_err.mean() <= theirs_err.mean()
    assert ours_err.mean() <= 0.5 * full.abs().mean()


def test_decode_smaller_than_tile_is_untiled(model):
    z = torch.randn(1, 32, 8, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z, tile_size=8), model.decode(z), rtol=0, atol=0)


def test_bad_tiling_arguments_raise(model):
    z = torch.randn(1, 32, 10, 10)
    with pytest.raises(ValueError, match="tile_overlap=8"):
        model.decode(z, tile_size=8, tile_overlap=8)
    with pytest.raises(ValueError, match="tile_overlap=-1"):  # even when no tiling would be needed
        model.decode(z, tile_size=16, tile_overlap=-1)


# --- input validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, shape, needle",
    [
        ("encode", (1, 4, 64, 64), r"\(1, 4, 64, 64\).*\[B, 3, H, W\].*multiple of 8"),
        ("encode", (1, 3, 60, 64), r"\(1, 3, 60, 64\).*multiple of 8"),
        ("encode", (3, 64, 64), r"\(3, 64, 64\)"),
        ("encode_to_dit", (1, 3, 72, 64), r"\(1, 3, 72, 64\).*multiple of 16"),
        ("decode", (1, 16, 8, 8), r"\(1, 16, 8, 8\).*\[B, 32, h, w\]"),
        ("patchify", (1, 32, 7, 8), r"\(1, 32, 7, 8\).*multiple of 2"),
        ("unpatchify", (1, 32, 4, 4), r"\(1, 32, 4, 4\).*\[B, 128, h, w\]"),
        ("normalize", (1, 32, 4, 4), r"\[B, 128, h, w\]"),
        ("denormalize", (1, 64, 4, 4), r"\[B, 128, h, w\]"),
        ("decode_from_dit", (1, 32, 4, 4), r"\[B, 128, h, w\]"),
    ],
)
def test_bad_shapes_raise_value_error(model, call, shape, needle):
    with pytest.raises(ValueError, match=needle):
        getattr(model, call)(torch.zeros(shape))
