"""Hardening of the template stage: inpaint masks placed like their images (template, processor, the
bundled toy template with force_inpaint), finite template inputs and caches, and bad call arguments
of TemplatePipeline named instead of raw TypeError / KeyError / AttributeError."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.loading.finite import NonFiniteError
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.image_io import MaskSizeError, image_to_tensor, resize_image
from diffsynth_templates.pipelines.random_init import random_flux2_pipeline
from diffsynth_templates.templates import (
    InputField,
    InputSchema,
    TemplateError,
    TemplateInputError,
    TemplatePipeline,
    save_template_folder,
)
from diffsynth_templates.templates.cache import NonFiniteCacheError
from diffsynth_templates.templates.processors import get_processor
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.zoo import Inpaint, InpaintConfig, template_spec
from tests.templates.helpers import (
    ConstantLoRA,
    ConstantLoRAConfig,
    Emit,
    EmitConfig,
    ScalarKV,
    ScalarKVConfig,
    save_declarative,
)

TOY_BASE, TOY_INPAINT = "models/toy/base", "models/toy/templates/inpaint"
TOY_CALL = dict(prompt="a red square", height=64, width=64, num_inference_steps=2, cfg_scale=1.0, seed=0)
CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, max_sequence_length=16)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pipe():
    return random_flux2_pipeline()


@pytest.fixture(scope="module")
def toy():
    return Flux2ImagePipeline.from_pretrained(TOY_BASE, device="cpu", torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def toy_inpaint():
    return TemplatePipeline.from_pretrained(
        [TOY_INPAINT], device="cpu", torch_dtype=torch.float32, host_store=HostStore()
    )


def tall_image_and_mask() -> tuple[Image.Image, np.ndarray]:
    """A 64 x 128 (width x height) image whose rows 80.. are marked for regeneration."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8))
    mask = np.zeros((128, 64), np.uint8)
    mask[80:] = 255
    return image, mask


def placed(image, height: int, width: int) -> np.ndarray:
    return ((resize_image(image_to_tensor(image), height, width)[0] + 1) / 2).permute(1, 2, 0).numpy()


# -- force_inpaint through TemplatePipeline with the bundled toy template --------------------------------


def test_force_inpaint_with_explicit_none_arguments_keeps_the_unmasked_pixels(toy, toy_inpaint):
    # infer.py passes inpaint_mask=None / input_image=None; None is not "passed directly". The 64 x 128
    # image is cropped to its rows 32..95 on a 64 x 64 output, so the masked rows 80.. land on rows
    # 48..63, and rows 0..47 must be the input's own pixels, exactly (a stretched mask would start at 40).
    image, mask = tall_image_and_mask()
    inputs = [{"image": image, "mask": Image.fromarray(mask), "force_inpaint": True}]
    out = toy_inpaint(
        toy, template_inputs=inputs, inpaint_mask=None, input_image=None, **TOY_CALL, output_type="np", progress=False
    )  # fmt: skip
    expected = placed(image, 64, 64)
    assert np.abs(out[0][:48] - expected[:48]).max() == 0
    assert np.abs(out[0][49:] - expected[49:]).mean() > 1e-3


def test_a_value_passed_directly_and_by_a_template_is_still_an_error(toy, toy_inpaint):
    image, mask = tall_image_and_mask()
    inputs = [{"image": image, "mask": mask, "force_inpaint": True}]
    with pytest.raises(
        TemplateError, match="'inpaint_mask' was passed directly and also produced by a template"
    ):
        toy_inpaint.prepare(toy, template_inputs=inputs, inpaint_mask=mask, input_image=image, **TOY_CALL)


def test_the_bundled_template_refuses_a_mask_of_another_size_unless_resize_mask(toy, toy_inpaint):
    image, mask = tall_image_and_mask()
    small = np.asarray(Image.fromarray(mask).resize((32, 64), Image.NEAREST))
    with pytest.raises(MaskSizeError, match=r"input 'mask' is 32x64 .* input 'image' is 64x128"):
        toy_inpaint.prepare(toy, template_inputs=[{"image": image, "mask": small}], **TOY_CALL)
    inputs = [{"image": image, "mask": small, "resize_mask": True, "force_inpaint": True}]
    out = toy_inpaint(toy, template_inputs=inputs, **TOY_CALL, output_type="np", progress=False)
    assert np.abs(out[0][:46] - placed(image, 64, 64)[:46]).max() == 0  # rows 80.. -> 48.., soft edge
    with pytest.raises(TemplateInputError, match="'resize_mask' must be true or false"):
        toy_inpaint.prepare(
            toy, template_inputs=[{"image": image, "mask": small, "resize_mask": 1}], **TOY_CALL
        )


def test_the_inpaint_template_places_its_mask_channel_like_its_image(pipe):
    # encoded at 32 x 32 (2 x 2 tokens), the 64 x 128 image keeps its rows 32..95, two per output row
    model = Inpaint(InpaintConfig.tiny())
    image, _ = tall_image_and_mask()
    mask = np.zeros((128, 64), np.uint8)
    mask[96:] = 255  # cropped away: the mask channel is all zero (a stretched mask marks the bottom)
    with torch.no_grad():
        latents = model.process_inputs(pipe=pipe, image=image, mask=mask, height=32, width=32)["latents"]
        assert latents[0, -1].abs().max() == 0
        mask[:64] = 255  # rows 32..63 of the image: the top token row of the encoded window
        latents = model.process_inputs(pipe=pipe, image=image, mask=mask, height=32, width=32)["latents"]
    assert torch.equal(latents[0, -1], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_the_inpaint_processor_checks_a_rows_mask_against_its_image():
    image = Image.new("RGB", (64, 48))
    row = {"template_inputs": {"mask": Image.new("L", (32, 32))}}
    with pytest.raises(MaskSizeError, match=r"template_inputs\['mask'\] is 32x32 .* is 64x48"):
        get_processor("inpaint")(row, image, 0)
    assert get_processor("inpaint", resize_mask=True)(row, image, 0)["resize_mask"] is True
    same = {"template_inputs": {"mask": Image.new("L", (64, 48))}}
    assert "resize_mask" not in get_processor("inpaint")(same, image, 0)


# -- finite template inputs and caches --------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [0.5, math.nan], 10**400])
def test_schema_refuses_non_finite_numbers_even_without_a_range(value):
    schema = InputSchema([InputField("gain", "float", required=False), InputField("xs", "list[float]", required=False)])  # fmt: skip
    name = "xs" if isinstance(value, list) else "gain"
    with pytest.raises(TemplateInputError, match=f"template 'glow': input '{name}'"):
        schema.validate({name: value}, "template 'glow'")


def test_schema_refuses_non_finite_values_in_undeclared_inputs():
    schema = InputSchema([], allow_extra=True)
    with pytest.raises(TemplateInputError, match=r"template 'x': input 'extra' holds NaN or inf"):
        schema.validate({"extra": {"a": [1.0, float("nan")]}}, "template 'x'")
    with pytest.raises(TemplateInputError, match="input 'tensor' holds NaN or inf"):
        schema.validate({"tensor": torch.tensor([0.0, math.inf])}, "template 'x'")
    assert schema.validate({"ok": [1, 2.5, "s", None]}, "template 'x'") == {"ok": [1, 2.5, "s", None]}


def test_template_pipeline_names_the_template_and_field_of_a_nan_input(pipe, tmp_path):
    folder = save_declarative(tmp_path / "glow", ConstantLoRA(ConstantLoRAConfig()))
    tp = TemplatePipeline.from_pretrained([str(folder)], device="cpu", host_store=HostStore())
    with pytest.raises(TemplateInputError, match=r"template 'glow': input 'gain' holds NaN or inf"):
        tp(pipe, template_inputs=[{"gain": math.nan}], **CALL)
    undeclared = save_declarative(tmp_path / "emit", Emit(EmitConfig("lora")))
    tp = TemplatePipeline.from_pretrained([str(undeclared)], device="cpu", host_store=HostStore())
    with pytest.raises(TemplateInputError, match=r"template 'emit': input 'value' holds NaN or inf"):
        tp(pipe, template_inputs=[{"value": math.inf}], **CALL)
    with pytest.raises(TemplateInputError, match=r"step_start must be a number in \[0, 1\], got 'x'"):
        tp(pipe, template_inputs=[{"step_start": "x"}], **CALL)


def test_a_template_whose_weights_overflow_is_named_before_denoising(pipe, tmp_path):
    model = ScalarKV(ScalarKVConfig())
    # finite weights (a load-time check passes them) whose output overflows to inf: at scale 0 the
    # input embedding is [1, 1, 1, 1, 0, 0, 0, 0], so each output sums four 3e38 terms
    with torch.no_grad():
        for proj in model.proj.values():
            proj.weight.fill_(3e38)
            proj.bias.fill_(3e38)
    folder = save_declarative(tmp_path / "hot", model)
    tp = TemplatePipeline.from_pretrained([str(folder)], device="cpu", host_store=HostStore())
    steps = []
    with pytest.raises(NonFiniteCacheError, match=r"template 'hot'.*\['kv_cache'\].*NaN or inf"):
        tp(pipe, template_inputs=[{"scale": 0.0}], **CALL, callback_on_step_end=lambda *a: steps.append(1))
    assert not steps  # refused before the first denoising step


def test_the_inpaint_template_with_huge_weights_is_refused(pipe, tmp_path):
    model = Inpaint(InpaintConfig.tiny())
    with torch.no_grad():
        for proj in model.proj_v.values():
            proj.weight.fill_(3e38)
    folder = save_template_folder(tmp_path / "inpaint", model, template_spec(model))
    tp = TemplatePipeline.from_pretrained([str(folder)], device="cpu", host_store=HostStore())
    image, mask = tall_image_and_mask()
    with pytest.raises(NonFiniteError, match="template 'inpaint'"):
        tp(pipe, template_inputs=[{"image": image, "mask": mask}], **CALL)


# -- bad call arguments of TemplatePipeline ------------------------------------------------------------


@pytest.fixture(scope="module")
def scalar(tmp_path_factory):
    folder = save_declarative(tmp_path_factory.mktemp("t") / "scalar", ScalarKV(ScalarKVConfig()))
    return TemplatePipeline.from_pretrained([str(folder)], device="cpu", host_store=HostStore())


@pytest.mark.parametrize(
    "template_inputs, match",
    [
        (
            {"scale": 0.5},
            r"template_inputs must be a list of dicts, one per template use, got a dict; wrap it",
        ),
        (["scale"], r"template input #0 must be a dict like \{'model_id': 0, ...\}, got 'scale'"),
        ("scale", "template_inputs must be a list of dicts"),
        (5, "template_inputs must be a list of dicts"),
        ([{"model_id": 3, "scale": 0.5}], "model_id 3 is out of range: 1 template"),
        ([{"model_id": "nope", "scale": 0.5}], "unknown model_id 'nope'; loaded templates are"),
        ([{"model_id": 1.0, "scale": 0.5}], "model_id must be an index or a template name, got 1.0"),
        ([{"model_id": None, "scale": 0.5}], "model_id must be an index or a template name, got None"),
        ([{"scale": "high"}], r"input 'scale' must be a number, got 'high'"),
        ([{"scale": 0.5, "step_end": None}], "step_end must be a number"),
    ],
)
def test_bad_template_inputs_are_named(pipe, scalar, template_inputs, match):
    with pytest.raises(TemplateInputError, match=match):
        scalar(pipe, template_inputs=template_inputs, **CALL)


def test_bad_negative_template_inputs_are_named(pipe, scalar):
    with pytest.raises(TemplateInputError, match="negative_template_inputs must be a list of dicts"):
        scalar(pipe, template_inputs=[], negative_template_inputs={"scale": 1}, cfg_scale=2.0, **CALL)


@pytest.mark.parametrize(
    "sources, kwargs, match",
    [
        ([5], {}, r"sources must be one or a list of template folders .* got \[5\]"),
        (None, {}, "sources must be one or a list of template folders"),
        ([TOY_INPAINT], {"names": ["a", "b"]}, "names has 2 entries for 1 sources"),
        ([TOY_INPAINT], {"names": [5]}, r"names must be one or a list of template names .* got \[5\]"),
        ([TOY_INPAINT], {"names": [""]}, "names must be non-empty strings"),
        ([TOY_INPAINT], {"lazy_loading": "yes"}, "lazy_loading must be True or False"),
        ([TOY_INPAINT], {"max_resident": 0, "lazy_loading": True}, "max_resident must be an integer >= 1"),
        ([TOY_INPAINT], {"memo_size": -1}, "memo_size must be an integer >= 0"),
        ([TOY_INPAINT], {"device": "gpu"}, "device must be like 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
        ([TOY_INPAINT], {"torch_dtype": "float32"}, "torch_dtype must be a floating-point torch.dtype"),
    ],
)
def test_bad_from_pretrained_arguments_are_named(sources, kwargs, match):
    kwargs = {"device": "cpu", **kwargs}
    with pytest.raises(TemplateError, match=match) as info:
        TemplatePipeline.from_pretrained(sources, host_store=HostStore(), **kwargs)
    assert isinstance(info.value, DiffSynthTemplatesError)


def test_a_pipe_that_is_not_a_pipeline_is_named(scalar):
    with pytest.raises(TemplateError, match="pipe must be a base pipeline .* got NoneType"):
        scalar(None, template_inputs=[{"scale": 0.5}], prompt="x")


@pytest.mark.parametrize(
    "inputs, match",
    [
        ("scale", r"inputs must be a list of input fields .* got 'scale'"),
        (["scale"], r"inputs\[0\] must be an object with 'name' and 'type', got 'scale'"),
        ([{"name": "s", "kind": "float"}], r"inputs\[0\] \('s'\) has unknown key\(s\) \['kind'\]"),
        ([{"type": "float"}], r"no 'name'"),
        ([{"name": "s", "type": "double"}], "has type 'double'; expected one of"),
        ([{"name": "s", "type": "float", "minimum": "0"}], "minimum must be a finite number or absent"),
        ([{"name": "s", "type": "float", "maximum": math.inf}], "maximum must be a finite number or absent"),
        ([{"name": "s", "required": "no"}], "required must be true or false"),
        ({"fields": [], "allow_extra": "yes"}, "allow_extra' must be true or false"),
        ({"field": []}, r"unknown key\(s\) \['field'\]"),
    ],
)
def test_bad_declared_inputs_are_named(inputs, match):
    with pytest.raises(TemplateInputError, match=match):
        InputSchema.from_json(inputs)


@pytest.mark.parametrize(
    "size", [{"height": 10**9}, {"width": 2**70}, {"height": 48.5}, {"width": 20}, {"width": "x"}]
)
def test_encode_sizes_of_image_templates_are_bounded_and_named(pipe, size):
    model = Inpaint(InpaintConfig.tiny())
    image, mask = tall_image_and_mask()
    with pytest.raises(TemplateInputError, match="height|width|exceeds"):
        with torch.no_grad():
            model.process_inputs(pipe=pipe, image=image, mask=mask, **size)
