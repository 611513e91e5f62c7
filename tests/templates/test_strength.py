"""Per-template strength (DESIGN.md 4.7): 0 is the image without the template and 1 today's image, bit
for bit, for KV and LoRA templates, alone and composed, on both CFG sides, for every family; values in
between and above scale the effect; bad values are refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from diffsynth_templates.backbones.attention import KVCacheError, attention
from diffsynth_templates.pipelines.families import FAMILIES
from diffsynth_templates.pipelines.kv_schedule import merge_kv_caches, with_log_strength
from diffsynth_templates.pipelines.lora import applied_lora
from diffsynth_templates.templates import TemplateCacheError, TemplateInputError, TemplatePipeline
from diffsynth_templates.templates.cache import TemplateOutput, apply_strength, scale_lora
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.schema import InputField
from tests.templates.helpers import (
    ConstantLoRA,
    ConstantLoRAConfig,
    Emit,
    EmitConfig,
    ScalarKV,
    ScalarKVConfig,
    save_declarative,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=3, seed=0, max_sequence_length=32)
CFG = 3.0  # both CFG sides run (Z-Image's own default is 1)


def image(pipe, **kw):
    return pipe(**{**CALL, "cfg_scale": CFG, "output_type": "np", "progress": False, **kw})


def run(tp, pipe, inputs, negative=None, **kw):
    return tp(pipe, template_inputs=inputs, negative_template_inputs=negative, **{**CALL, "cfg_scale": CFG, "output_type": "np", "progress": False, **kw})  # fmt: skip


def kv_template(tmp_path, pipe, name: str, seed: int, length: int = 4):
    """A KV template over every block of ``pipe``'s DiT."""
    specs = pipe.dit.kv_block_specs
    spec = next(iter(specs.values()))
    torch.manual_seed(seed)
    model = ScalarKV(ScalarKVConfig(list(specs), heads=spec.heads, head_dim=spec.head_dim, length=length))
    return save_declarative(tmp_path / name, model)


def lora_template(tmp_path, pipe, name: str, seed: int):
    """A LoRA template on the first attention output projection of ``pipe``'s DiT."""
    module, layer = next(
        (n, m)
        for n, m in pipe.dit.named_modules()
        if isinstance(m, nn.Linear) and n.endswith(("attn.to_out", "attention.to_out.0"))
    )
    torch.manual_seed(seed)
    config = ConstantLoRAConfig(module, layer.in_features, layer.out_features, rank=2)
    return save_declarative(tmp_path / name, ConstantLoRA(config))


def templates(folders):
    return TemplatePipeline.from_pretrained([str(f) for f in folders], device="cpu", host_store=HostStore())


KINDS = {"kv": (kv_template, {"scale": 0.7}), "lora": (lora_template, {"gain": 3.0})}


@pytest.fixture(params=sorted(FAMILIES))
def pipe(request, pipes):
    return pipes[request.param]


def one(tmp_path, pipe, kind: str, name: str = "t", seed: int = 0):
    make, inputs = KINDS[kind]
    return make(tmp_path, pipe, name, seed), {"model_id": name, **inputs}


# --- identities ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_strength_zero_is_the_image_without_the_template(pipe, kind, tmp_path):
    folder, item = one(tmp_path, pipe, kind)
    tp = templates([folder])
    base = image(pipe)
    assert np.array_equal(run(tp, pipe, [{**item, "strength": 0}], [{**item, "strength": 0.0}]), base)
    with_template = run(tp, pipe, [item], [item])
    assert np.abs(with_template - base).max() > 1e-4  # the template does something
    # per CFG side: the negative side at 0 is the call with the positive template only
    assert np.array_equal(run(tp, pipe, [item], [{**item, "strength": 0}]), run(tp, pipe, [item]))
    assert np.array_equal(run(tp, pipe, [{**item, "strength": 0}], [item]), run(tp, pipe, [], [item]))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_strength_one_is_todays_image(pipe, kind, tmp_path):
    folder, item = one(tmp_path, pipe, kind)
    tp = templates([folder])
    today = run(tp, pipe, [item], [item])
    assert np.array_equal(run(tp, pipe, [{**item, "strength": 1}], [{**item, "strength": 1.0}]), today)
    # and today's image is the cache passed straight to the pipeline: no bias, no scaling on the way
    prepared = tp.prepare(pipe, [item], [item], **CALL, cfg_scale=CFG)
    key = "kv_cache" if kind == "kv" else "lora"
    assert all(len(entry) == 2 for entry in prepared.get("kv_cache", {}).values())
    direct = image(pipe, **{key: prepared[key], f"negative_{key}": prepared[f"negative_{key}"]})
    assert np.array_equal(direct, today)


@pytest.mark.parametrize("kinds", [("kv", "kv"), ("kv", "lora"), ("lora", "lora")], ids="+".join)
def test_composed_identities(pipe, kinds, tmp_path):
    (fa, a), (fb, b) = (one(tmp_path, pipe, k, f"t{i}", seed=i) for i, k in enumerate(kinds))
    tp = templates([fa, fb])
    both = run(tp, pipe, [a, b], [b])
    assert np.array_equal(run(tp, pipe, [{**a, "strength": 1}, {**b, "strength": 1}], [{**b, "strength": 1}]), both)  # fmt: skip
    only_b = run(tp, pipe, [b], [b])
    assert np.array_equal(run(tp, pipe, [{**a, "strength": 0}, b], [b]), only_b)
    only_a = run(tp, pipe, [a])
    assert np.array_equal(run(tp, pipe, [a, {**b, "strength": 0}], [{**b, "strength": 0}]), only_a)
    # different strengths compose: a third image, finite, independent of the listing order
    mixed = run(tp, pipe, [{**a, "strength": 0.5}, {**b, "strength": 1.5}], [{**b, "strength": 0.25}])
    swapped = run(tp, pipe, [{**b, "strength": 1.5}, {**a, "strength": 0.5}], [{**b, "strength": 0.25}])
    assert np.isfinite(mixed).all() and np.array_equal(mixed, swapped)
    assert min(np.abs(mixed - x).max() for x in (both, only_a, only_b)) > 1e-5


def test_step_windows_with_strength(pipe, tmp_path):
    (fa, a), (fb, b) = one(tmp_path, pipe, "kv", "a", 0), one(tmp_path, pipe, "kv", "b", 1)
    tp = templates([fa, fb])
    late = {**a, "step_start": 0.4}
    assert np.array_equal(run(tp, pipe, [{**late, "strength": 0}, b]), run(tp, pipe, [b]))
    assert np.array_equal(run(tp, pipe, [{**late, "strength": 1}, b]), run(tp, pipe, [late, b]))
    half = run(tp, pipe, [{**late, "strength": 0.5}, {**b, "strength": 2.0}])
    assert np.isfinite(half).all() and np.abs(half - run(tp, pipe, [late, b])).max() > 1e-5


def test_batched_cfg_sides_match_two_passes(pipe, tmp_path):
    """Stacked CFG sides of different lengths and strengths (padding hidden by -inf in the bias) give
    the image of one DiT call per side."""
    (fa, a), (fb, b) = one(tmp_path, pipe, "kv", "a", 0), one(tmp_path, pipe, "kv", "b", 1)
    tp = templates([fa, fb])
    inputs = ([{**a, "strength": 0.5}, {**b, "strength": 1.5}], [{**b, "strength": 0.7}])
    batched = run(tp, pipe, *inputs)
    pipe.cfg_batching = False
    try:
        two_passes = run(tp, pipe, *inputs)
    finally:
        pipe.cfg_batching = True
    np.testing.assert_allclose(batched, two_passes, atol=1e-5)


# --- what strength does -----------------------------------------------------------------------------


def test_log_strength_bias_scales_the_attention_mass():
    """attention() with a template at strength s equals softmax where the template tokens' weights are
    multiplied by s before normalizing (computed here in float64), also with a padding mask."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 5, 2, 8, dtype=torch.float64) for _ in range(3))
    ek, ev = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 3, 2, 8, dtype=torch.float64)
    strengths = torch.tensor([0.5, 0.5, 2.0], dtype=torch.float64)  # two templates: 2 + 1 tokens
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # row 1 has 2 padding tokens
    out = attention(q, k, v, (ek, ev, strengths.log()[None]), mask=mask)

    keys, values = torch.cat([k, ek.expand(2, -1, -1, -1)], 1), torch.cat([v, ev.expand(2, -1, -1, -1)], 1)
    weight = torch.einsum("bqhd,bkhd->bhqk", q, keys).div(math.sqrt(8)).exp()
    scale = torch.cat([mask.double(), strengths.expand(2, -1)], 1)  # 0 on padding, s on template tokens
    weight = weight * scale[:, None, None, :]
    expected = torch.einsum("bhqk,bkhd->bqhd", weight / weight.sum(-1, keepdim=True), values).flatten(2)
    torch.testing.assert_close(out, expected)
    # a zero bias is the plain call (up to rounding: it takes the masked kernel)
    torch.testing.assert_close(attention(q, k, v, (ek, ev, torch.zeros(1, 3, dtype=torch.float64))), attention(q, k, v, (ek, ev)))  # fmt: skip


def test_merged_cache_keeps_each_templates_strength():
    k = torch.randn(1, 2, 2, 4)
    merged = merge_kv_caches([with_log_strength({"b": (k, k)}, 0.5), {"b": (k, k)}, with_log_strength({"b": (k, k)}, 3.0)])  # fmt: skip
    bias = merged["b"][2]
    assert merged["b"][0].shape[1] == 6
    torch.testing.assert_close(bias, torch.tensor([[math.log(0.5)] * 2 + [0.0] * 2 + [math.log(3.0)] * 2]))
    assert len(merge_kv_caches([{"b": (k, k)}, {"b": (k, k)}])["b"]) == 2  # strength 1: no bias at all


def test_lora_strength_scales_the_delta():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    lora = {"lora_A.weight": torch.randn(2, 6), "lora_B.weight": torch.randn(4, 2)}
    model = nn.Sequential()
    model.add_module("lin", layer)
    lora = {f"lin.{k}": v for k, v in lora.items()}
    x = torch.randn(3, 6)
    base = layer(x)
    with applied_lora(model, lora):
        full = model(x) - base
    with applied_lora(model, scale_lora(lora, 0.3)):
        scaled = model(x) - base
    torch.testing.assert_close(scaled, 0.3 * full)


def test_strength_moves_the_toy_brightness_monotonically():
    """The bundled toy world: a bright target, strength 0, 0.5, 1, 1.5 -> mean brightness rises."""
    from pathlib import Path

    from diffsynth_templates.pipelines.auto import load_pipeline

    toy = Path(__file__).resolve().parents[2] / "models" / "toy"
    toy_pipe = load_pipeline(toy / "base", device="cpu")
    tp = TemplatePipeline.from_pretrained([str(toy / "templates" / "brightness")], device="cpu")
    call = dict(prompt="a large red circle at the center on a blue background", height=64, width=64)
    call.update(num_inference_steps=8, seed=0, cfg_scale=1.0, progress=False, output_type="np")
    means = [
        float(tp(toy_pipe, template_inputs=[{"scale": 0.9, "strength": s}], **call).mean())
        for s in (0.0, 0.5, 1.0, 1.5)
    ]
    assert all(b > a + 0.01 for a, b in zip(means, means[1:])), means


# --- other cache keys, bad values, the CLI ----------------------------------------------------------


def test_strength_of_unscalable_outputs(tmp_path, pipes):
    pipe = pipes["flux2"]
    text = save_declarative(tmp_path / "text", Emit(EmitConfig("extra_text_embedding")))
    size = save_declarative(tmp_path / "size", Emit(EmitConfig("denoising_strength")))
    tp = templates([text, size])
    embedding = torch.randn(1, 2, pipe.dit.config.text_dim)
    with pytest.raises(TemplateCacheError, match=r"'text' produces \['extra_text_embedding'\].*strength 0"):
        tp.prepare(pipe, [{"model_id": "text", "value": embedding, "strength": 0.5}], **CALL)
    with pytest.raises(TemplateCacheError, match=r"'size' produces only \['denoising_strength'\]"):
        tp.prepare(pipe, [{"model_id": "size", "value": 1.0, "strength": 2}], **CALL)
    dropped = tp.prepare(pipe, [{"model_id": "text", "value": embedding, "strength": 0}], **CALL)
    assert "extra_text_embedding" not in dropped
    kept = tp.prepare(pipe, [{"model_id": "size", "value": 1.0, "strength": 1}], **CALL)
    assert kept["denoising_strength"] == 1.0


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "0.5", True, None, [1.0]])
def test_bad_strength_is_refused_naming_it(tmp_path, pipes, bad):
    pipe = pipes["flux2"]
    folder, item = one(tmp_path, pipe, "kv")
    with pytest.raises(TemplateInputError, match=r"template 't': strength must be a finite number >= 0"):
        templates([folder]).prepare(pipe, [{**item, "strength": bad}], **CALL)


def test_strength_is_reserved():
    with pytest.raises(TemplateInputError, match="reserved"):
        InputField("strength", "float")


def test_cli_parses_strength(tiny_klein_root, tmp_path, capsys):
    import infer

    assert infer.parse_pairs("model_id=0 strength=0.6 scale=0.7") == {
        "model_id": 0,
        "strength": 0.6,
        "scale": 0.7,
    }
    common = ["--model", str(tiny_klein_root), "--height", "32", "--width", "32", "--steps", "1",
              "--max_sequence_length", "16", "--quiet", "--device", "cpu", "--template", str(tmp_path / "none")]  # fmt: skip
    for bad in ("-1", "nan", "'x'"):
        with pytest.raises(SystemExit) as exit_info:
            infer.main([*common, "--template_input", f"strength={bad}", "--output", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2
        assert "template_input[0]: strength must be a finite number >= 0" in capsys.readouterr().err
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"template_inputs": [{"model_id": 0, "strength": -0.1}]}))
    with pytest.raises(SystemExit):
        infer.main([*common, "--job", str(job), "--output", str(tmp_path / "x.png")])
    error = capsys.readouterr().err
    assert "template_input[0]: strength must be a finite number >= 0" in error and "got -0.1" in error


def test_cli_strength_zero_is_the_plain_image(tiny_klein_root, tmp_path):
    import infer
    from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline

    folder = kv_template(tmp_path, Flux2ImagePipeline.from_pretrained(tiny_klein_root, device="cpu"), "kv", 0)
    common = ["--model", str(tiny_klein_root), "--height", "32", "--width", "32", "--steps", "2",
              "--max_sequence_length", "16", "--quiet", "--device", "cpu"]  # fmt: skip
    plain = infer.main([*common, "--output", str(tmp_path / "plain.png")])[0]
    runs = {
        s: infer.main(
            [
                *common,
                "--template",
                str(folder),
                "--template_input",
                f"scale=0.8 strength={s}",
                "--output",
                str(tmp_path / f"s{s}.png"),
            ]
        )[0]  # fmt: skip
        for s in ("0", "0.5", "1")
    }
    pixels = {s: np.asarray(Image.open(p)).astype(int) for s, p in {"plain": plain, **runs}.items()}
    assert np.array_equal(pixels["0"], pixels["plain"])
    assert np.abs(pixels["1"] - pixels["plain"]).max() > 0 and np.abs(pixels["0.5"] - pixels["1"]).max() > 0
    assert json.loads(Image.open(runs["0.5"]).text["parameters"])["template_inputs"] == [
        {"scale": 0.8, "strength": 0.5}
    ]


def test_call_settings_are_kept_at_any_positive_strength():
    """An inpainting template's mask and image are not a matter of degree: its KV is scaled, they stay."""
    k, mask = torch.randn(1, 2, 2, 4), torch.ones(1, 1, 4, 4)
    out = TemplateOutput("inpaint", {"kv_cache": {"b": (k, k)}, "inpaint_mask": mask}, strength=0.5)
    scaled = apply_strength(out)
    assert scaled.cache["inpaint_mask"] is mask and out.cache["kv_cache"]["b"] == (k, k)  # input untouched
    torch.testing.assert_close(scaled.cache["kv_cache"]["b"][2], torch.full((1, 2), math.log(0.5)))
    assert apply_strength(TemplateOutput("inpaint", out.cache, strength=0.0)) is None
    assert apply_strength(TemplateOutput("inpaint", out.cache)).cache is out.cache


def test_a_strength_sweep_runs_the_template_once(tmp_path, pipes):
    pipe = pipes["flux2"]
    folder, item = one(tmp_path, pipe, "kv")
    tp = templates([folder])
    images = [run(tp, pipe, [{**item, "strength": s}]) for s in (0.0, 0.5, 1.0, 1.5)]
    assert tp.memo.misses == 1 and tp.memo.hits == 3  # strength is applied at merge time
    assert len({im.tobytes() for im in images}) == 4


def test_a_bias_of_the_wrong_shape_is_named(pipes):
    dit = pipes["flux2"].dit
    spec = dit.kv_block_specs["single_0"]
    k = torch.randn(1, 3, spec.heads, spec.head_dim)
    dit.validate_kv_cache({"single_0": (k, k, torch.zeros(1, 3))})
    with pytest.raises(
        KVCacheError, match=r"\['single_0'\] third entry must be .* float logit bias \[1 or batch, 3\]"
    ):
        dit.validate_kv_cache({"single_0": (k, k, torch.zeros(1, 4))})
