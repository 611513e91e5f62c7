"""Repeated template-stage calls reuse their memory: KV written in place by the templates that can
(``writes_kv_out``: value_kv), and the merge buffers kept on the CPU and handed out again only when
nothing holds the previous result. The caches stay bit-identical to the ordinary merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsynth_templates.templates import TemplatePipeline, build_architecture, save_template_folder
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.stream_merge import (
    MERGE_ARENAS,
    BlockBuffer,
    KVOut,
    ReusedArena,
    merge_arenas,
)
from diffsynth_templates.templates.zoo import template_spec
from diffsynth_templates.templates.zoo.value_kv import ValueKVConfig
from tests.templates.helpers import ordinary_merge

pytestmark = pytest.mark.usefixtures("one_thread")


def value_kv(seed: int, length: int = 6):
    torch.manual_seed(seed)
    model = build_architecture("value_kv", ValueKVConfig.tiny(length=length).__dict__)
    for p in model.parameters():  # trained-looking weights: every token differs
        p.data.normal_(0, 0.05)
    return model.eval()


@pytest.fixture
def folders(tmp_path):
    out = []
    for i, length in enumerate((6, 6, 4)):
        model = value_kv(70 + i, length)
        out.append(save_template_folder(tmp_path / f"v{i}", model, template_spec(model, name=f"v{i}")))
    return out


def stage(folders, memo_size):
    tp = TemplatePipeline.from_pretrained(
        folders, torch_dtype=torch.float32, device="cpu", lazy_loading=True, memo_size=memo_size,
        host_store=HostStore(),
    )  # fmt: skip
    tp.merge_arenas = merge_arenas()  # its own, not the process's: the counts below are this test's
    return tp


def same_kv(a, b) -> bool:
    return a.keys() == b.keys() and all(
        len(a[n]) == len(b[n]) and all(torch.equal(x, y) for x, y in zip(a[n], b[n])) for n in a
    )


POSITIVE = [
    {"model_id": 0, "scale": 0.2},
    {"model_id": 1, "scale": 0.7, "strength": 0.5},
    {"model_id": 2, "scale": 0.4},
    {"model_id": 0, "scale": 0.9, "strength": 0.0},
    {"model_id": 1, "scale": 0.1},
]
NEGATIVE = [{"model_id": 2, "scale": 0.3}, {"model_id": 0, "scale": 0.6}]


def shifted(inputs, call):
    return [{**item, "scale": round(item["scale"] * 0.9 + 0.01 * call, 4)} for item in inputs]


@torch.no_grad()
def test_value_kv_writes_into_the_rows_it_is_offered_with_the_same_bits():
    model = value_kv(1)
    features = model.process_inputs(scale=0.35)
    plain = model(**features)["kv_cache"]
    blocks = list(plain)
    first = plain[blocks[0]][0]
    buffer = BlockBuffer(first, capacity=3 * first.shape[1])
    buffer.add(plain[blocks[0]], spare=2 * first.shape[1])  # one output already merged: rows 0..5 taken
    written = model(**features, kv_out=KVOut({blocks[0]: buffer}))["kv_cache"]
    k, v = written[blocks[0]]
    assert k.data_ptr() == buffer.k[:, first.shape[1] :].data_ptr()  # in the buffer, after the first
    assert v.data_ptr() == buffer.v[:, first.shape[1] :].data_ptr()
    assert all(torch.equal(written[b][i], plain[b][i]) for b in blocks for i in (0, 1))
    # blocks without a buffer get tensors of their own
    assert all(written[b][0].data_ptr() != plain[b][0].data_ptr() for b in blocks[1:])
    buffer.add(written[blocks[0]], spare=0)  # found in place: merged without a copy, same result
    k_all, v_all = buffer.result()[:2]
    assert buffer.filled == 2 * first.shape[1]
    assert torch.equal(k_all[:, first.shape[1] : 2 * first.shape[1]], plain[blocks[0]][0])


def test_rows_are_offered_only_where_an_entry_lands_as_it_is():
    k = torch.zeros(1, 4, 2, 16)
    buffer = BlockBuffer(k, capacity=8)
    out = KVOut({"single_0": buffer})
    assert out.rows("single_0", 0, (1, 4, 2, 16), torch.float32) is None  # autograd on: never
    torch.set_grad_enabled(False)
    assert out.rows("single_0", 0, (1, 4, 2, 16), torch.float32).shape == (1, 4, 2, 16)
    assert out.rows("single_0", 1, (1, 8, 2, 16), torch.float32) is not None
    assert out.rows("single_0", 0, (1, 9, 2, 16), torch.float32) is None  # more tokens than are left
    assert out.rows("single_0", 0, (1, 4, 2, 16), torch.bfloat16) is None  # another dtype
    assert out.rows("single_0", 0, (2, 4, 2, 16), torch.float32) is None  # another batch
    assert out.rows("single_0", 0, (1, 4, 4, 8), torch.float32) is None  # other heads
    assert out.rows("double_0", 0, (1, 4, 2, 16), torch.float32) is None  # no buffer for the block
    torch.set_grad_enabled(True)


def test_streamed_in_place_stage_equals_the_ordinary_merge(pipes, folders):
    """Both CFG sides, strengths 0 / 0.5 / 1, templates of other lengths, a step window: the memo-off
    stage (in-place writes, reused buffers) gives the memo-on stage's caches bit for bit, call after
    call with new inputs."""
    pipe = pipes["flux2"]
    windowed = [*POSITIVE, {"model_id": 2, "scale": 0.5, "step_start": 0.5}]
    streamed, ordinary = stage(folders, 0), stage(folders, 32)
    for call in range(3):
        positive, negative = shifted(windowed, call), shifted(NEGATIVE, call)
        a = streamed.prepare(pipe, positive, negative, prompt="a", cfg_scale=3.0)
        b = ordinary_merge(ordinary, pipe, positive, negative, cfg_scale=3.0)
        assert same_kv(a["negative_kv_cache"], b["negative_kv_cache"])
        entries_a, entries_b = a["kv_cache"].entries, b["kv_cache"].entries  # scheduled: the window
        assert [(s, e) for _, s, e in entries_a] == [(s, e) for _, s, e in entries_b]
        assert all(same_kv(x, y) for (x, _, _), (y, _, _) in zip(entries_a, entries_b))
        del a, b, entries_a, entries_b  # nothing holds the results: the next call may reuse their memory
    assert streamed.merge_arenas["positive"].reuses == 2  # calls 2 and 3 reused call 1's memory
    assert streamed.merge_arenas["negative"].reuses == 2


def test_merge_memory_is_reused_only_when_nothing_holds_the_previous_result(pipes, folders):
    pipe = pipes["flux2"]
    tp, reference = stage(folders, 0), stage(folders, 32)
    arena = tp.merge_arenas["positive"]
    # every output merged (no strength 0), so the result is the buffers themselves, not a trimmed copy
    inputs = [item for item in POSITIVE if item.get("strength") != 0.0]

    def call(n):
        return tp.prepare(pipe, shifted(inputs, n), prompt="a", cfg_scale=1.0)["kv_cache"]

    def expected(n):
        return ordinary_merge(reference, pipe, shifted(inputs, n))["kv_cache"]

    held = call(0)
    snapshot = {n: tuple(t.clone() for t in e) for n, e in held.items()}
    second = call(1)  # the first result is still held: fresh memory, the held result untouched
    assert arena.reuses == 0
    assert same_kv(held, snapshot) and same_kv(held, expected(0)) and same_kv(second, expected(1))
    del held, second
    assert same_kv(call(2), expected(2)) and arena.reuses == 1  # dropped: its memory is used again

    block = next(iter(expected(3)))
    view = call(3)[block][0][:, :2]  # only a slice of the result kept: still the same memory
    kept = view.clone()
    reuses = arena.reuses
    fourth = call(4)
    assert arena.reuses == reuses and torch.equal(view, kept)
    assert same_kv(fourth, expected(4))


def test_device_memory_is_never_kept():
    arena = ReusedArena()
    first = arena.take(1024, torch.float32, torch.device("meta"))
    assert first.device.type == "meta" and arena.kept is None
    arena.take(1024, torch.float32, torch.device("meta"))
    assert arena.reuses == 0
    cpu = ReusedArena()
    a = cpu.take(1024, torch.float32, torch.device("cpu"))
    del a
    b = cpu.take(512, torch.float32, torch.device("cpu"))  # smaller: served from the kept memory
    assert cpu.reuses == 1 and b.numel() == 512 and b.data_ptr() == cpu.kept.data_ptr()
    c = cpu.take(4096, torch.float32, torch.device("cpu"))  # larger: new memory, kept instead
    assert cpu.reuses == 1 and cpu.kept.numel() == 4096 and c.data_ptr() == cpu.kept.data_ptr()
    del b, c
    other = cpu.take(64, torch.float64, torch.device("cpu"))  # another dtype: never the kept memory
    assert cpu.reuses == 1 and other.dtype == torch.float64
    del other  # the kept float64 memory is free now, but on the CPU
    elsewhere = cpu.take(64, torch.float64, torch.device("meta"))  # another device: never the kept memory
    assert cpu.reuses == 1 and elsewhere.device.type == "meta"


def test_images_through_reused_memory_equal_the_ordinary_stage(pipes, folders):
    """Whole calls (templates, denoising on both CFG sides, decoding): images from the reused,
    written-in-place merge memory equal the memo-on stage's, call after call."""
    pipe = pipes["flux2"]
    call = dict(prompt="a", height=32, width=32, num_inference_steps=2, cfg_scale=3.0, seed=0, progress=False)
    streamed, ordinary = stage(folders, 0), stage(folders, 32)
    for n in range(3):
        inputs = dict(template_inputs=shifted(POSITIVE, n), negative_template_inputs=shifted(NEGATIVE, n))
        a = np.asarray(streamed(pipe, **inputs, **call)[0])
        merged = ordinary_merge(
            ordinary, pipe, inputs["template_inputs"], inputs["negative_template_inputs"], 3.0
        )
        b = np.asarray(pipe(**call, **merged)[0])
        assert np.array_equal(a, b)
    assert streamed.merge_arenas["positive"].reuses == 2 and streamed.merge_arenas["negative"].reuses == 2


def test_memo_on_stage_merges_new_inputs_into_reused_memory(pipes, folders):
    """With the output memo on, a call that computes outputs merges them into the reused merge memory
    and keeps no merged copy; a call whose outputs all come from the memo keeps its merge for the next
    identical call. Every result equals the ordinary merge."""
    pipe = pipes["flux2"]
    tp, reference = stage(folders, 32), stage(folders, 32)
    for n in range(3):
        result = tp.prepare(pipe, shifted(POSITIVE, n), prompt="a", cfg_scale=1.0)["kv_cache"]
        expected = ordinary_merge(reference, pipe, shifted(POSITIVE, n))["kv_cache"]
        assert same_kv(result, expected)
        del result
    assert tp.merge_arenas["positive"].reuses == 2 and len(tp._merge_memo) == 0
    repeat = tp.prepare(pipe, shifted(POSITIVE, 2), prompt="a", cfg_scale=1.0)["kv_cache"]  # all memoized
    assert len(tp._merge_memo) == 1 and same_kv(repeat, expected)
    again = tp.prepare(pipe, shifted(POSITIVE, 2), prompt="a", cfg_scale=1.0)["kv_cache"]
    assert all(again[n][0] is repeat[n][0] for n in again)  # the kept merge itself


def test_pipelines_share_the_process_merge_memory(pipes, folders):
    """By default every template pipeline of a process merges into the same kept memory: what stays
    between calls is one call's merged KV, however many pipelines there are."""
    pipe = pipes["flux2"]
    make = lambda memo: TemplatePipeline.from_pretrained(  # noqa: E731
        folders,
        torch_dtype=torch.float32,
        device="cpu",
        lazy_loading=True,
        memo_size=memo,
        host_store=HostStore(),
    )
    first, second = make(0), make(32)
    assert first.merge_arenas is second.merge_arenas is MERGE_ARENAS
    inputs = [item for item in POSITIVE if item.get("strength") != 0.0]
    held = first.prepare(pipe, shifted(inputs, 0), prompt="a", cfg_scale=1.0)["kv_cache"]
    reuses = MERGE_ARENAS["positive"].reuses
    other = second.prepare(pipe, shifted(inputs, 1), prompt="a", cfg_scale=1.0)["kv_cache"]
    assert MERGE_ARENAS["positive"].reuses == reuses  # the first result is held: fresh memory
    assert same_kv(held, ordinary_merge(first, pipe, shifted(inputs, 0))["kv_cache"])
    del held, other
    again = first.prepare(pipe, shifted(inputs, 2), prompt="a", cfg_scale=1.0)["kv_cache"]
    assert MERGE_ARENAS["positive"].reuses == reuses + 1  # the second pipeline's memory, used again
    assert same_kv(again, ordinary_merge(first, pipe, shifted(inputs, 2))["kv_cache"])
