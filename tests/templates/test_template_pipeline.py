"""TemplatePipeline: folder formats, trust, composition laws, residency accounting, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsynth_templates.pipelines.random_init import random_flux2_pipeline
from diffsynth_templates.templates import (
    TemplateCacheError,
    TemplateInputError,
    TemplatePipeline,
    TemplateTrustError,
    load_template_folder,
)
from diffsynth_templates.templates.residency import HostStore
from tests.templates.helpers import (
    ConstantLoRA,
    ConstantLoRAConfig,
    Emit,
    EmitConfig,
    ScalarKV,
    ScalarKVConfig,
    save_declarative,
    write_diffsynth_folder,
)

CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, max_sequence_length=32)


@pytest.fixture(scope="module")
def pipe():
    return random_flux2_pipeline()


def image(pipe, **kw):
    return pipe(**{**CALL, "output_type": "np", "progress": False, **kw})


def templates(sources, **kw):
    kw.setdefault("host_store", HostStore())
    kw.setdefault("device", "cpu")
    return TemplatePipeline.from_pretrained([str(s) for s in sources], **kw)


def scalar_kv(tmp_path, name, seed, length=4, blocks=("single_0", "double_0")):
    torch.manual_seed(seed)
    model = ScalarKV(ScalarKVConfig(block_names=blocks, length=length))
    return save_declarative(tmp_path / name, model)


def run(tp, pipe, inputs, negative=None, **kw):
    return tp(pipe, template_inputs=inputs, negative_template_inputs=negative, **{**CALL, "output_type": "np", "progress": False, **kw})  # fmt: skip


# --- DiffSynth-format folders ---------------------------------------------------------------------


def test_diffsynth_folder_needs_trust(pipe, tmp_path):
    folder = write_diffsynth_folder(tmp_path / "brightness", pipe.dit)
    with pytest.raises(TemplateTrustError, match="trust_remote_code=True"):
        templates([folder])
    with pytest.raises(TypeError, match="trust_remote_code must be True or False"):
        templates([folder], trust_remote_code="yes")


def test_diffsynth_folder_matches_direct_kv_cache(pipe, tmp_path):
    folder = write_diffsynth_folder(tmp_path / "brightness", pipe.dit)
    tp = templates([folder], trust_remote_code=True)
    through_templates = run(tp, pipe, [{"model_id": 0, "scale": 0.7}], cfg_scale=2.0)

    loaded = load_template_folder(folder, trust_remote_code=True)
    with torch.no_grad():
        cache = loaded.model(**loaded.model.process_inputs(pipe=pipe, scale=0.7))
    direct = image(pipe, kv_cache=cache["kv_cache"], cfg_scale=2.0)
    assert np.array_equal(through_templates, direct)
    assert np.abs(direct - image(pipe, cfg_scale=2.0)).max() > 1e-4  # the template does something


def test_declarative_loads_without_code(pipe, tmp_path):
    folder = scalar_kv(tmp_path, "kv", seed=0)
    assert not (folder / "model.py").exists()
    tp = templates([folder])
    out = run(tp, pipe, [{"scale": 0.3}])
    assert np.abs(out - image(pipe)).max() > 1e-4


# --- composition laws -----------------------------------------------------------------------------


def test_two_kv_templates_in_either_order(pipe, tmp_path):
    a, b = scalar_kv(tmp_path, "a", seed=1), scalar_kv(tmp_path, "b", seed=2, blocks=("single_1",))
    tp = templates([a, b])
    ab = run(tp, pipe, [{"model_id": "a", "scale": 0.2}, {"model_id": "b", "scale": 0.9}], cfg_scale=2.0)
    ba = run(tp, pipe, [{"model_id": "b", "scale": 0.9}, {"model_id": "a", "scale": 0.2}], cfg_scale=2.0)
    assert np.array_equal(ab, ba)
    only_a = run(tp, pipe, [{"model_id": "a", "scale": 0.2}], cfg_scale=2.0)
    assert np.abs(ab - only_a).max() > 1e-4


def test_zero_length_kv_gives_base_image(pipe, tmp_path):
    tp = templates([scalar_kv(tmp_path, "empty", seed=3, length=0)])
    assert np.array_equal(run(tp, pipe, [{"scale": 0.5}], cfg_scale=2.0), image(pipe, cfg_scale=2.0))


def lora_folder(tmp_path, name, pipe, zero_b=False, seed=0):
    torch.manual_seed(seed)
    dim = pipe.dit.config.hidden_size
    model = ConstantLoRA(
        ConstantLoRAConfig(in_features=dim + pipe.dit.config.mlp_hidden, out_features=dim, zero_b=zero_b)
    )
    return save_declarative(tmp_path / name, model)


def test_zero_b_lora_gives_base_image(pipe, tmp_path):
    tp = templates([lora_folder(tmp_path, "lora0", pipe, zero_b=True)])
    assert np.array_equal(run(tp, pipe, [{}]), image(pipe))


def test_lora_template_repeated_never_accumulates(pipe, tmp_path):
    before = {k: v.clone() for k, v in pipe.dit.state_dict().items()}
    tp = templates([lora_folder(tmp_path, "lora", pipe, seed=4)])
    outs = [run(tp, pipe, [{"gain": 0.5}]) for _ in range(10)]
    assert all(np.array_equal(o, outs[0]) for o in outs)
    assert np.abs(outs[0] - image(pipe)).max() > 1e-4
    assert all(torch.equal(v, before[k]) for k, v in pipe.dit.state_dict().items())
    assert np.array_equal(image(pipe), image(pipe))  # and the pipeline alone is the base again


def test_negative_side_skipped_when_cfg_is_one(pipe, tmp_path):
    tp = templates([scalar_kv(tmp_path, "kv", seed=5)])
    run(tp, pipe, [{"scale": 0.1}], negative=[{"scale": 0.9}], cfg_scale=1.0)
    assert tp.memo.misses == 1  # only the positive input ran
    run(tp, pipe, [{"scale": 0.1}], negative=[{"scale": 0.9}], cfg_scale=2.0)
    assert tp.memo.misses == 2 and tp.memo.hits == 1  # positive reused from the memo, negative computed


def test_negative_templates_change_the_cfg_image(pipe, tmp_path):
    tp = templates([scalar_kv(tmp_path, "kv", seed=6)])
    with_neg = run(tp, pipe, [{"scale": 0.1}], negative=[{"scale": 0.9}], cfg_scale=3.0)
    without = run(tp, pipe, [{"scale": 0.1}], cfg_scale=3.0)
    assert np.abs(with_neg - without).max() > 1e-4


def test_step_window_applies_kv_to_part_of_the_steps(pipe, tmp_path):
    tp = templates([scalar_kv(tmp_path, "kv", seed=7)])
    kw = dict(num_inference_steps=4)
    full = run(tp, pipe, [{"scale": 0.4}], **kw)
    late = run(tp, pipe, [{"scale": 0.4, "step_start": 0.5}], **kw)
    base = image(pipe, **kw)
    assert np.abs(late - full).max() > 1e-5 and np.abs(late - base).max() > 1e-5
    with pytest.raises(TemplateInputError, match="step_start"):
        run(tp, pipe, [{"scale": 0.4, "step_start": 0.8, "step_end": 0.2}])


def test_identical_inputs_are_memoized(pipe, tmp_path):
    tp = templates([scalar_kv(tmp_path, "kv", seed=8)], memo_size=2)
    first = run(tp, pipe, [{"scale": 0.4}])
    second = run(tp, pipe, [{"scale": 0.4}])
    assert np.array_equal(first, second) and tp.memo.hits == 1
    for s in (0.1, 0.2, 0.3):
        run(tp, pipe, [{"scale": s}])
    assert len(tp.memo) == 2  # bounded


def test_repeated_outputs_are_merged_once(pipe, tmp_path, monkeypatch):
    """The merge of memoized outputs is reused (it copies every KV token); new inputs merge anew, as
    they arrive, into the pipeline's reused merge memory (one merged output, nothing kept)."""
    import diffsynth_templates.templates.pipeline as mod

    merges = []
    real = mod._merge_side
    monkeypatch.setattr(mod, "_merge_side", lambda outputs: merges.append(len(outputs)) or real(outputs))
    tp = templates([scalar_kv(tmp_path, "a", seed=1), scalar_kv(tmp_path, "b", seed=2)])
    inputs = [{"model_id": 0, "scale": 0.4}, {"model_id": 1, "scale": 0.6}]
    first = run(tp, pipe, inputs)  # computed: merged into the reused merge memory, nothing kept
    assert merges == [1]  # (the KV arrives as one merged output)
    assert np.array_equal(run(tp, pipe, inputs), first) and merges == [1, 1]  # all memoized: merge kept
    assert np.array_equal(run(tp, pipe, inputs), first) and merges == [1, 1]  # the kept merge
    changed = run(tp, pipe, [inputs[0], {"model_id": 1, "scale": 0.7}])
    assert merges == [1, 1, 1] and np.abs(changed - first).max() > 0
    no_memo = templates([scalar_kv(tmp_path, "c", seed=3)], memo_size=0)
    run(no_memo, pipe, [{"scale": 0.4}])
    run(no_memo, pipe, [{"scale": 0.4}])
    assert merges == [1, 1, 1, 1, 1]  # without the output memo nothing is known to repeat


# --- residency ------------------------------------------------------------------------------------


def test_six_templates_budget_one(pipe, tmp_path):
    from diffsynth_templates.templates import folder as folder_mod

    sources = [scalar_kv(tmp_path, f"t{i}", seed=10 + i, blocks=(f"single_{i % 2}",)) for i in range(6)]
    store = HostStore()
    tp = templates(sources, lazy_loading=True, max_resident=1, host_store=store, memo_size=0)
    assert sum(store.disk_loads.values()) == 0  # lazy: nothing read yet
    reads_before = {str(s.resolve()): folder_mod.DISK_READS[str(s.resolve())] for s in sources}
    inputs = [{"model_id": i, "scale": 0.1 * i} for i in (0, 1, 2, 3, 4, 5, 0, 2)]
    for _ in range(3):
        run(tp, pipe, inputs)
    assert all(store.disk_loads[str(s.resolve())] == 1 for s in sources)
    assert all(folder_mod.DISK_READS[str(s.resolve())] - reads_before[str(s.resolve())] == 1 for s in sources)
    assert tp.scheduler.stats.max_resident == 1
    assert all(len(resident) <= 1 for _, resident in tp.scheduler.stats.residency_log)
    # inputs are grouped: each template goes onto the device once per call, even t0 and t2 used twice
    assert all(tp.scheduler.stats.to_device[f"t{i}"] == 3 for i in range(6))
    assert not tp.scheduler.resident  # all moved off after the call


def test_eager_loading_keeps_all_resident(pipe, tmp_path):
    sources = [scalar_kv(tmp_path, f"e{i}", seed=20 + i) for i in range(3)]
    tp = templates(sources)
    run(tp, pipe, [{"model_id": 2, "scale": 0.5}])
    assert len(tp.scheduler.resident) == 3


# --- errors ---------------------------------------------------------------------------------------


def emit_folder(tmp_path, name, key):
    return save_declarative(tmp_path / name, Emit(EmitConfig(key=key)))


def test_conflicting_non_mergeable_keys(pipe, tmp_path):
    tp = templates([emit_folder(tmp_path, "e1", "input_image"), emit_folder(tmp_path, "e2", "input_image")])
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(TemplateCacheError, match="'e1' and 'e2' both produce 'input_image'"):
        run(tp, pipe, [{"model_id": 0, "value": img}, {"model_id": 1, "value": img}])


def test_unknown_cache_key(pipe, tmp_path):
    tp = templates([emit_folder(tmp_path, "odd", "brightness_tokens")])
    with pytest.raises(TemplateCacheError, match="'odd' produced 'brightness_tokens'"):
        run(tp, pipe, [{"value": 1}])


def test_negative_only_keys_are_refused(pipe, tmp_path):
    tp = templates([emit_folder(tmp_path, "img", "input_image")])
    with pytest.raises(TemplateCacheError, match="'img' produced 'input_image'"):
        run(tp, pipe, [], negative=[{"value": np.zeros((32, 32, 3), np.uint8)}], cfg_scale=2.0)


def test_wrong_head_dim_names_the_template(pipe, tmp_path):
    model = ScalarKV(ScalarKVConfig(block_names=("single_0",), head_dim=8, heads=4))
    tp = templates([save_declarative(tmp_path / "badkv", model)])
    with pytest.raises(ValueError, match=r"template 'badkv'.*single_0.*4 x 8"):
        run(tp, pipe, [{"scale": 0.5}])


def test_unknown_model_id_and_missing_input(pipe, tmp_path):
    tp = templates([scalar_kv(tmp_path, "kv", seed=30)])
    with pytest.raises(TemplateInputError, match="unknown model_id 'nope'.*'kv'"):
        run(tp, pipe, [{"model_id": "nope", "scale": 0.5}])
    with pytest.raises(TemplateInputError, match="model_id 3 is out of range"):
        run(tp, pipe, [{"model_id": 3, "scale": 0.5}])
    with pytest.raises(TemplateInputError, match="missing input 'scale'"):
        run(tp, pipe, [{"model_id": 0}])
    with pytest.raises(TemplateInputError, match="'scale' = 1.5 is above the maximum 1.0"):
        run(tp, pipe, [{"scale": 1.5}])
    with pytest.raises(TemplateInputError, match=r"unknown input\(s\) \['sclae'\]"):
        run(tp, pipe, [{"sclae": 0.5}])


def test_passing_a_template_key_directly_too(pipe, tmp_path):
    tp = templates([emit_folder(tmp_path, "img", "input_image")])
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(TemplateCacheError, match="passed directly and also produced"):
        run(tp, pipe, [{"value": img}], input_image=img)


def test_user_kv_cache_merges_with_templates(pipe, tmp_path):
    folder = scalar_kv(tmp_path, "kv", seed=31)
    tp = templates([folder])
    loaded = load_template_folder(folder)
    with torch.no_grad():
        cache = loaded.model(**loaded.model.process_inputs(scale=0.5))["kv_cache"]
    both = run(tp, pipe, [{"scale": 0.5}], kv_cache=cache)
    doubled = {n: (torch.cat([k, k], 1), torch.cat([v, v], 1)) for n, (k, v) in cache.items()}
    assert np.abs(both - image(pipe, kv_cache=doubled)).max() <= 1e-6
