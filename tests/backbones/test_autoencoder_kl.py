"""AutoencoderKL (the Z-Image / FLUX.1 16-channel VAE) against diffusers' AutoencoderKL on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from diffsynth_templates.backbones.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig

diffusers = pytest.importorskip("diffusers")
from tests.tiny_zimage import TINY_VAE  # noqa: E402

TOL = 1e-4


def tiny_reference(quant_convs: bool, seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        **{**TINY_VAE, "use_quant_conv": quant_convs, "use_post_quant_conv": quant_convs}
    ).eval()
    with torch.no_grad():  # GroupNorm affines start at 1 / 0: move them so a wrong one shows
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module", params=[False, True], ids=["no-quant-conv", "quant-conv"])
def pair(request, tmp_path_factory):
    ref = tiny_reference(request.param)
    folder = tmp_path_factory.mktemp("vae")
    ref.save_pretrained(folder, max_shard_size="40KB")
    return ref, AutoencoderKL.from_pretrained(folder), folder


def test_checkpoint_is_sharded(pair):
    assert len(list(pair[2].glob("diffusion_pytorch_model-*.safetensors"))) > 1


def test_encode_mode_matches_diffusers(pair):
    ref, ours, _ = pair
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(images).latent_dist.mode()
        got = ours.encode(images)
    assert got.shape == expected.shape == (2, 16, 16, 24)
    assert (got - expected).abs().max().item() <= TOL


def test_decode_matches_diffusers(pair):
    ref, ours, _ = pair
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.decode(latents).sample
        got = ours.decode(latents)
    assert (got - expected).abs().max().item() <= TOL
    assert expected.std() > 0.05


def test_dit_normalization_round_trips(pair):
    _, ours, _ = pair
    z = torch.randn(1, 16, 4, 4)
    assert torch.allclose(ours.normalize(z), (z - 0.1159) * 0.3611)
    assert torch.allclose(ours.denormalize(ours.normalize(z)), z, atol=1e-6)


def test_config_round_trip_and_flux1_preset(pair):
    raw = json.loads((pair[2] / "config.json").read_text())
    cfg = AutoencoderKLConfig.from_dict(raw)
    assert AutoencoderKLConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.downsample_factor == 2
    flux1 = AutoencoderKLConfig.flux1()
    with torch.device("meta"):
        big = AutoencoderKL(flux1)
    assert flux1.downsample_factor == 8 and flux1.latent_channels == 16
    assert 8.0e7 < sum(p.numel() for p in big.parameters()) < 8.6e7


def test_wrong_class_and_shapes_are_named(pair):
    with pytest.raises(ValueError, match="AutoencoderKLFlux2"):
        AutoencoderKLConfig.from_dict({"_class_name": "AutoencoderKLFlux2"})
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKLConfig(block_out_channels=(24,), norm_num_groups=32)
    with pytest.raises(ValueError, match="AutoencoderKL.encode"):
        pair[1].encode(torch.zeros(1, 3, 33, 32))
