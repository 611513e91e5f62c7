"""The zoo behaviour both backbones must keep, one test body each, parametrized over the families (ids
``flux2-<task>`` / ``zimage-<task>``): every architecture at its tiny config fits its DiT, saves and
reloads, and steers its pipeline; untrained LoRA templates change nothing; force_inpaint keeps the
unmasked pixels. What only one backbone has (FLUX.2's key RoPE and init from the DiT, full-size shapes,
the learning runs, Z-Image's patchified latents, detection and refusal across backbones) stays in
tests/templates/test_zoo.py and test_zoo_zimage.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffsynth_templates.loading.write_safety import MARKER
from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.templates import TemplatePipeline, load_template_folder, save_template_folder
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.zoo import Inpaint, InpaintConfig, template_spec
from tests.templates.zoo_cases import (
    CALL,
    TINY,
    TINY_CASES,
    TINY_IDS,
    check_cache,
    half_mask,
    perturb_zeros,
    rgb,
)

# the KV blocks of each family's random tiny DiT: every KV template at its tiny config feeds all of them
TINY_BLOCKS = {"flux2": {"double_0", "single_0", "single_1"}, "zimage": {"block_0", "block_1"}}
TINY_INPAINT = {"flux2": InpaintConfig.tiny, "zimage": InpaintConfig.tiny_zimage}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_every_family_has_its_tiny_zoo():
    assert set(TINY) == set(FAMILIES) == set(TINY_BLOCKS) == set(TINY_INPAINT)


@pytest.mark.parametrize("family, task", TINY_CASES, ids=TINY_IDS)
def test_tiny_template_end_to_end(pipes, tmp_path, family, task):
    pipe = pipes[family]
    build, inputs = TINY[family][task]
    torch.manual_seed(0)
    model = build()
    perturb_zeros(model)
    with torch.no_grad():
        cache = model(pipe=pipe, **model.process_inputs(pipe=pipe, **inputs))
    check_cache(pipe, cache)
    assert set(cache) <= set(model.cache_keys)
    if "kv_cache" in cache:
        assert set(cache["kv_cache"]) == TINY_BLOCKS[family] == set(pipe.dit.kv_block_specs)

    folder = save_template_folder(tmp_path / task, model, template_spec(model, name=task))
    assert sorted(p.name for p in folder.iterdir() if p.name != MARKER) == [
        "README.md",
        "model.safetensors",
        "template.json",
    ]
    assert json.loads((folder / "template.json").read_text())["base_backbone"] == family
    loaded = load_template_folder(folder)
    assert loaded.model.config == model.config  # JSON round trip restores tuples, ranges, flags

    tp = TemplatePipeline.from_pretrained([str(folder)], device="cpu", host_store=HostStore())
    out = tp(pipe, template_inputs=[inputs], **CALL, output_type="np", progress=False)
    base = pipe(**CALL, output_type="np", progress=False)
    assert out.shape == base.shape == (1, 32, 32, 3)
    assert np.abs(out - base).max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
@pytest.mark.parametrize("task", ["image_lora", "lora_bank"])
def test_untrained_lora_templates_are_no_ops(pipes, family, task):
    pipe = pipes[family]
    build, inputs = TINY[family][task]
    model = build()
    with torch.no_grad():
        cache = model(pipe=pipe, **model.process_inputs(pipe=pipe, **inputs))
    base = pipe(**CALL, output_type="np", progress=False)
    assert np.array_equal(pipe(**CALL, lora=cache["lora"], output_type="np", progress=False), base)


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_force_inpaint_keeps_the_unmasked_pixels(pipes, tmp_path, family):
    pipe = pipes[family]
    torch.manual_seed(0)
    model = Inpaint(TINY_INPAINT[family]())
    perturb_zeros(model)
    folder = save_template_folder(tmp_path / "inpaint", model, template_spec(model))
    tp = TemplatePipeline.from_pretrained([str(folder)], device="cpu", host_store=HostStore())
    image, mask = rgb(), half_mask()
    out = tp(pipe, template_inputs=[{"image": image, "mask": mask, "force_inpaint": True}], **CALL, output_type="np", progress=False)  # fmt: skip
    constrained = pipe(**CALL, input_image=image, inpaint_mask=mask, output_type="np", progress=False)
    keep = mask == 0
    assert np.array_equal(out[0][keep], constrained[0][keep])  # outside: exactly the input's round trip
    assert np.abs(out[0][~keep] - constrained[0][~keep]).max() > 1e-3  # inside: the template acts

    with torch.no_grad():
        free = model.process_inputs(pipe=pipe, image=image, mask=mask)
    assert "inpaint_mask" not in model(pipe=pipe, **free)
