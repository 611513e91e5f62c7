"""The zoo on Z-Image: patchified latents, full-size shapes on the meta device, and a template built for
one backbone is refused on the other. Every architecture built for a Z-Image DiT fitting it and steering
its pipeline, and force_inpaint, are tested for both backbones in tests/templates/test_zoo_families.py."""

from __future__ import annotations

import json

import pytest
import torch

from diffsynth_templates.backbones.zimage_dit import ZImageDiT, ZImageDiTConfig
from diffsynth_templates.pipelines.auto import detect_backbone, load_pipeline
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.lora import validate_lora
from diffsynth_templates.pipelines.random_init import random_flux2_pipeline, random_zimage_pipeline
from diffsynth_templates.pipelines.zimage_pipeline import ZImagePipeline
from diffsynth_templates.templates import TemplateError, TemplatePipeline, save_template_folder
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.zoo import (
    ImageKV,
    ImageKVConfig,
    ImageLoRA,
    ImageLoRAConfig,
    Inpaint,
    InpaintConfig,
    ValueKV,
    ValueKVConfig,
    template_spec,
)
from tests.templates.zoo_cases import CALL, half_mask, rgb

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return random_zimage_pipeline()


def test_image_kv_patchifies_the_zimage_latents(pipe):
    """16-channel latents at 1/2 resolution (tiny VAE), 2x2 latent pixels per token, mask per latent pixel."""
    model = Inpaint(InpaintConfig.tiny_zimage())
    with torch.no_grad():
        latents = model.process_inputs(pipe=pipe, image=rgb(), mask=half_mask())["latents"]
        kv = model(latents=latents)["kv_cache"]
    assert latents.shape == (1, 17, 16, 16)
    assert torch.equal(latents[0, -1, 0], torch.tensor([0.0] * 8 + [1.0] * 8))
    assert kv["block_0"][0].shape == (1, 64, 2, 32)  # one token per 4 x 4 pixels, like the DiT's own
    assert model.init_from_dit(pipe.dit) == []  # FLUX.2 encoder blocks share no names with Z-Image's
    with pytest.raises(Exception, match=r"multiples of 2"):
        model(latents=torch.zeros(1, 17, 15, 16))


def test_full_size_zimage_shapes():
    with torch.device("meta"):
        dit = ZImageDiT(ZImageDiTConfig())
        value = ValueKV(ValueKVConfig.z_image())
        kv = value(**value.process_inputs(scale=0.5))["kv_cache"]
        image = ImageKV(ImageKVConfig.z_image())
        image_kv = image(latents=torch.empty(1, 16, 128, 128))["kv_cache"]  # a 1024 x 1024 condition
        lora = ImageLoRA(ImageLoRAConfig.z_image())(latents=torch.empty(1, 16, 64, 64))["lora"]
    assert len(kv) == 30 and all(k.shape == (1, 512, 30, 128) for k, _ in kv.values())
    dit.validate_kv_cache(kv)
    assert image_kv["block_29"][1].shape == (1, 4096, 30, 128)
    dit.validate_kv_cache(image_kv)
    assert len(lora) == 2 * 4 * 30  # A and B for q, k, v, out of the 30 main blocks
    validate_lora(dit, lora)
    # one value: two encoders per block, (256 -> 3840 -> 3840) MLP + 512 x 3840 positions
    per_encoder = (256 * 3840 + 3840) + (3840 * 3840 + 3840) + 512 * 3840
    assert sum(p.numel() for p in value.parameters()) == 2 * 30 * per_encoder


# --- backbone detection and refusal ------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    random_flux2_pipeline().save_pretrained(root / "tiny-klein")
    random_zimage_pipeline().save_pretrained(root / "tiny-z-image-turbo")
    return root / "tiny-klein", root / "tiny-z-image-turbo"


def test_backbone_is_read_from_the_folder(folders, tmp_path):
    klein, zimage = folders
    assert detect_backbone(klein) == "flux2" and detect_backbone(zimage) == "zimage"
    assert isinstance(load_pipeline(klein, device="cpu"), Flux2ImagePipeline)
    loaded = load_pipeline(zimage, device="cpu")
    assert isinstance(loaded, ZImagePipeline) and loaded.variant == "turbo"
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "SomethingElse"}))
    with pytest.raises(ValueError, match="cannot tell which backbone.*'SomethingElse'"):
        detect_backbone(tmp_path / "odd")


def test_template_on_the_wrong_backbone_is_refused(folders, tmp_path):
    klein, zimage = folders
    flux_pipe = Flux2ImagePipeline.from_pretrained(klein, device="cpu")
    z_pipe = ZImagePipeline.from_pretrained(zimage, device="cpu")
    for name, model, base, wrong_pipe, right_pipe in (
        ("z", ValueKV(ValueKVConfig.tiny_zimage()), zimage, flux_pipe, z_pipe),
        ("f", ValueKV(ValueKVConfig.tiny()), klein, z_pipe, flux_pipe),
    ):
        folder = save_template_folder(tmp_path / name, model, template_spec(model, base_model=str(base)))
        tp = TemplatePipeline.from_pretrained([str(folder)], device="cpu", host_store=HostStore())
        with pytest.raises(TemplateError) as err:
            tp(wrong_pipe, template_inputs=[{"scale": 0.5}], **CALL, progress=False)
        message = str(err.value)
        assert str(base) in message and wrong_pipe.name_or_path in message, message
        assert "FLUX.2" in message and "Z-Image" in message
        tp(right_pipe, template_inputs=[{"scale": 0.5}], **CALL, progress=False)  # the right base works
