"""The family records: registry, detection, KV layout, the template contract, the shared adapter."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from PIL import Image

from diffsynth_templates.pipelines.auto import BACKBONE_TITLES, detect_backbone, pipeline_class
from diffsynth_templates.pipelines.common import PipelineInputError
from diffsynth_templates.pipelines.families import (
    FAMILIES,
    UnsupportedFeatureError,
    detect_family,
    family_of_config,
    family_of_dit,
    get_family,
)
from diffsynth_templates.pipelines.families.flux2 import FLUX2
from diffsynth_templates.pipelines.families.zimage import ZIMAGE
from diffsynth_templates.templates.pipeline import TemplatePipeline
from diffsynth_templates.templates.zoo._common import backbone_of_names, base_layout, kv_block_names

FAMILY_NAMES = sorted(FAMILIES)
# what TemplatePipeline used to read off ``pipe.__call__``'s signature: every argument but these
NOT_CACHE_KEYS = {"self", "prompt", "negative_prompt", "output_type", "progress", "callback_on_step_end",
                  "max_pixels", "resize_mask"}  # fmt: skip
NOT_CACHE_KEYS |= {"reuse_edit_kv", "step_cache"}  # speed options of the call, not set by templates


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_registry_names_titles_and_pipeline_classes():
    assert FAMILY_NAMES == ["flux2", "zimage"]
    assert BACKBONE_TITLES == {"flux2": "FLUX.2", "zimage": "Z-Image"}
    for name, family in FAMILIES.items():
        assert family.name == name and get_family(name) is family
        cls = pipeline_class(name)
        assert cls is family.pipeline_class() and cls.family is family and cls.backbone == name
    with pytest.raises(PipelineInputError, match=r"unknown backbone 'sd3'.*flux2.*zimage"):
        get_family("sd3")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_detection_from_class_names(tmp_path, name):
    family = FAMILIES[name]
    for i, class_name in enumerate(family.class_names):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert detect_family(folder) is family
        assert detect_backbone(folder) == name


def test_detection_refuses_unknown_classes_naming_them(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(
        PipelineInputError, match=r"StableDiffusion3Pipeline.*Known classes.*Flux2KleinPipeline"
    ):
        detect_family(tmp_path)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_kv_layout_is_what_the_dit_accepts(pipes, name):
    family, dit = FAMILIES[name], pipes[name].dit
    layout = family.kv_layout(dit.config)
    assert layout.block_names == tuple(dit.kv_block_specs)
    for spec in dit.kv_block_specs.values():
        assert (spec.heads, spec.head_dim) == (layout.num_heads, layout.head_dim)
    # the templates' names for it agree
    assert kv_block_names(dit.config) == layout.block_names
    assert base_layout(dit.config).backbone == name
    assert backbone_of_names(layout.block_names) == name
    assert family_of_dit(dit) is family and family_of_config(dit.config) is family
    assert family.tiny_config() == dit.config


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_presets_are_config_classmethods(name):
    family = FAMILIES[name]
    for preset in family.presets:
        assert isinstance(family.preset(preset), family.dit_config_class)
    with pytest.raises(UnsupportedFeatureError, match="presets"):
        family.preset("nope")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_declared_cache_keys_equal_what_the_call_accepts(pipes, name):
    """The explicit contract says what the signature says (it replaced reflecting on it)."""
    pipe = pipes[name]
    params = set(inspect.signature(pipe.__call__).parameters) - NOT_CACHE_KEYS
    if not FAMILIES[name].supports_edit_images:  # one signature for all; the family refuses what it lacks
        params.discard("edit_image")
    assert pipe.accepted_cache_keys == {p for p in params if not p.startswith("negative_")}
    assert pipe.negative_cache_keys == {p[len("negative_") :] for p in params if p.startswith("negative_")}
    assert ("edit_image" in pipe.accepted_cache_keys) == FAMILIES[name].supports_edit_images


def test_default_cfg_scale_is_the_call_default_or_the_variant(pipes):
    flux, zimage = pipes["flux2"], pipes["zimage"]
    assert flux.default_cfg_scale == 4.0 and flux.default_num_inference_steps == 50
    assert zimage.default_cfg_scale == zimage.defaults.cfg_scale
    assert zimage.default_num_inference_steps == zimage.defaults.num_inference_steps
    # one __call__ for every family, defined once on FamilyPipeline; None means the model's default
    assert type(flux).__call__ is type(zimage).__call__
    assert inspect.signature(flux.__call__).parameters["cfg_scale"].default is None


def test_a_call_without_steps_or_cfg_uses_the_model_defaults(pipes):
    flux = pipes["flux2"]
    args = dict(height=16, width=16, seed=3, output_type="latent", progress=False)
    implicit = flux("a cat", **args)
    explicit = flux("a cat", num_inference_steps=50, cfg_scale=4.0, **args)
    assert torch.equal(implicit, explicit)


def test_zimage_refuses_edit_images_before_any_work(pipes):
    with pytest.raises(PipelineInputError, match=r"ZImagePipeline takes no edit_image"):
        pipes["zimage"]("a cat", height=32, width=32, edit_image=Image.new("RGB", (32, 32)), progress=False)


def test_template_pipeline_refuses_a_pipe_without_the_contract(pipes):
    class Bare:
        dit, device = pipes["flux2"].dit, torch.device("cpu")

        def __call__(self, **kwargs):
            return kwargs

    with pytest.raises(Exception, match=r"base pipeline.*accepted_cache_keys"):
        TemplatePipeline([]).prepare(Bare(), [], prompt="a cat")


def test_edit_images_are_refused_once_by_the_family():
    FLUX2.check_edit_images([3, 4])  # FLUX.2 takes reference images
    ZIMAGE.check_edit_images([])
    with pytest.raises(UnsupportedFeatureError, match=r"metadata lines 3, 4 have an edit_image.*Z-Image"):
        ZIMAGE.check_edit_images([3, 4])


def test_flux2_adapter_layout_round_trips_and_places_references():
    adapter = FLUX2.adapter
    latents = torch.randn(2, 8, 3, 5)
    tokens = adapter.pack(latents)
    assert tokens.shape == (2, 15, 8) and torch.equal(adapter.unpack(tokens, 3, 5), latents)
    ids = adapter.grid_ids(3, 5, t=0)
    assert ids.shape == (15, 4) and ids[7].tolist() == [0, 1, 2, 0]  # row-major
    refs, ref_ids = adapter.reference_tokens([torch.randn(1, 8, 2, 2), torch.randn(1, 8, 1, 3)], "cpu")
    assert refs.shape == (1, 7, 8) and ref_ids[:, 0].tolist() == [10] * 4 + [20] * 3
    embeds, text_ids = torch.zeros(1, 4, 6), torch.zeros(4, 4, dtype=torch.long)
    embeds, text_ids = adapter.append_text_tokens(embeds, text_ids, torch.ones(1, 2, 6), "extra")
    assert embeds.shape == (1, 6, 6) and text_ids[-2:, -1].tolist() == [4, 5]
    with pytest.raises(PipelineInputError, match=r"extra has shape \(1, 2, 5\)"):
        adapter.append_text_tokens(embeds, text_ids, torch.ones(1, 2, 5), "extra")


def test_zimage_adapter_conventions():
    adapter = ZIMAGE.adapter
    t = torch.tensor(250.0)  # the scheduler's sigma * 1000
    assert adapter.sampling_timestep(t, 2).tolist() == [0.75, 0.75]  # the DiT reads 1 - sigma
    assert adapter.training_timestep(torch.tensor([0.25]), torch.float32).tolist() == [0.75]
    out = torch.randn(1, 4, 2, 2)
    assert torch.equal(adapter.to_velocity(out), -out)  # the DiT predicts the negated velocity
    assert torch.equal(adapter.guide(out, out, 3.0), -out)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_cfg_batching_switch_gives_the_same_image(pipes, name):
    """The public switch benchmarks use: both CFG sides in one DiT call or two passes, same result."""
    pipe = pipes[name]
    size = pipe.pixels_per_token * 4
    kwargs = dict(prompt="a red circle", negative_prompt="blurry", height=size, width=size, cfg_scale=3.0,
                  num_inference_steps=2, seed=1, output_type="latent", progress=False)  # fmt: skip
    calls = []
    handle = pipe.dit.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        batched = pipe(**kwargs)
        pipe.cfg_batching = False
        sequential = pipe(**kwargs)
    finally:
        pipe.cfg_batching = True
        handle.remove()
    assert calls == [1] * 2 + [1] * 4  # one call per step batched, two per step otherwise
    assert (batched - sequential).abs().max() <= 1e-5


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_kv_cache_is_validated_once_per_call(pipes, name, monkeypatch):
    """Before the loop, not in every step's DiT call (``check_kv_each_step`` turns that back on)."""
    pipe = pipes[name]
    layout = FAMILIES[name].kv_layout(pipe.dit.config)
    kv = {block: (torch.zeros(1, 2, layout.num_heads, layout.head_dim),) * 2 for block in layout.block_names}
    checks = []
    original = pipe.dit.validate_kv_cache
    monkeypatch.setattr(
        pipe.dit, "validate_kv_cache", lambda *a, **k: (checks.append(1), original(*a, **k))[1]
    )
    size = pipe.pixels_per_token * 4
    kwargs = dict(prompt="a cat", height=size, width=size, cfg_scale=1.0, num_inference_steps=3, seed=0,
                  output_type="latent", progress=False, kv_cache=kv)  # fmt: skip
    once = pipe(**kwargs)
    assert len(checks) == 1
    pipe.check_kv_each_step = True
    try:
        again = pipe(**kwargs)
    finally:
        pipe.check_kv_each_step = False
    assert len(checks) == 1 + 1 + 3 and torch.equal(once, again)


@pytest.mark.parametrize(
    ("folder", "index", "expected"),
    [
        ("klein", {"_class_name": "Flux2KleinPipeline", "is_distilled": True}, (4, 1.0)),
        ("klein-base", {"_class_name": "Flux2KleinPipeline", "is_distilled": False}, (50, 4.0)),
        ("Z-Image-Turbo", {"_class_name": "ZImagePipeline"}, (8, 1.0)),
        ("Z-Image", {"_class_name": "ZImagePipeline"}, (50, 5.0)),
        ("other", {"_class_name": "SomethingElse"}, (50, 4.0)),
    ],
)
def test_recommended_defaults_come_from_the_family(tmp_path, folder, index, expected):
    from diffsynth_templates.pipelines.defaults import recommended_defaults

    root = tmp_path / folder
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps(index))
    found = recommended_defaults(root)
    assert (found.num_inference_steps, found.cfg_scale) == expected
