"""The template stage's loading: weights used in place from memory-mapped aligned files, pages handed
back on eviction, each folder parsed once, residency limits, and outputs identical to plain loading."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsynth_templates.loading.finite import nonfinite_names
from diffsynth_templates.loading.mapped import ALIGN, MappedWeights, save_aligned_safetensors
from diffsynth_templates.templates import TemplatePipeline
from diffsynth_templates.templates.folder import DISK_READS, load_template_folder
from diffsynth_templates.templates.residency import HostStore
from tests.templates.helpers import ScalarKV, ScalarKVConfig, ordinary_merge, save_declarative

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

BLOCKS = ("single_0", "single_1")


def scalar_kv(folder, seed, length=64):
    torch.manual_seed(seed)
    model = ScalarKV(ScalarKVConfig(block_names=BLOCKS, heads=2, head_dim=16, length=length))
    return save_declarative(folder, model)


def mapped_rss_kib(path) -> int:
    """Resident KiB of every mapping of ``path`` in this process (Linux smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def kv_of(template, scale=0.3):
    model = template.model
    return model(**model.process_inputs(scale=scale))["kv_cache"]


def test_aligned_writer_is_plain_safetensors(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),  # 60 bytes: not a multiple of 64, written after the others
        "b": torch.randn(64, 16),
        "c": torch.arange(7, dtype=torch.int64),
        "d": torch.randn(32).to(torch.bfloat16),
        "e": torch.zeros(0),
    }
    path = tmp_path / "w.safetensors"
    save_aligned_safetensors(tensors, path, metadata={"format": "pt"})
    back = load_file(str(path))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header) % ALIGN == 0
    mapped = dict(MappedWeights()([path]))
    assert all(torch.equal(mapped[k], tensors[k]) for k in tensors)
    assert mapped["b"].data_ptr() % ALIGN == 0


def test_mapped_weights_are_views_and_give_the_same_outputs(tmp_path):
    folder = scalar_kv(tmp_path / "t", seed=1)
    plain = load_template_folder(folder)
    mapped = load_template_folder(folder, map_weights=True)
    assert plain.mapped is None and mapped.mapped is not None
    assert all(p.data_ptr() % ALIGN == 0 for p in mapped.model.parameters())
    a, b = kv_of(plain), kv_of(mapped)
    assert all(torch.equal(a[n][i], b[n][i]) for n in BLOCKS for i in (0, 1))


@linux_only
def test_weights_are_not_copied_and_their_pages_are_handed_back(tmp_path):
    folder = scalar_kv(tmp_path / "t", seed=2, length=512)  # 2 x 64 KiB of weights per block
    weights = folder / "model.safetensors"
    loaded = load_template_folder(folder, map_weights=True)
    assert mapped_rss_kib(weights) > 0  # the finite check read them: resident, and from the file itself
    before = kv_of(loaded)
    loaded.mapped.drop_pages()
    assert mapped_rss_kib(weights) == 0
    after = kv_of(loaded)  # the next use maps them again from the page cache
    assert mapped_rss_kib(weights) > 0
    assert all(torch.equal(before[n][i], after[n][i]) for n in BLOCKS for i in (0, 1))


def test_unaligned_files_still_load_aligned_copies(tmp_path):
    folder = scalar_kv(tmp_path / "t", seed=3)
    reference = kv_of(load_template_folder(folder))
    tensors = load_file(str(folder / "model.safetensors"))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"pad": "x" * 3})  # data offset % 64 != 0
    loaded = load_template_folder(folder, map_weights=True)
    assert all(p.data_ptr() % ALIGN == 0 for p in loaded.model.parameters())
    out = kv_of(loaded)
    assert all(torch.equal(reference[n][i], out[n][i]) for n in BLOCKS for i in (0, 1))


def test_same_architecture_templates_are_independent_modules(tmp_path):
    """Templates of one architecture and config are built from one meta skeleton: each is its own."""
    first, second = (load_template_folder(scalar_kv(tmp_path / f"t{i}", seed=10 + i)) for i in range(2))
    assert first.model is not second.model
    assert all(p is not q for p, q in zip(first.model.parameters(), second.model.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(first.model.parameters(), second.model.parameters()))
    fresh = ScalarKV(ScalarKVConfig(block_names=BLOCKS, heads=2, head_dim=16, length=64))
    fresh.load_state_dict(load_file(str(tmp_path / "t0" / "model.safetensors")))
    expected = fresh(**fresh.process_inputs(scale=0.3))["kv_cache"]
    out = kv_of(first)
    assert all(torch.equal(expected[n][i], out[n][i]) for n in BLOCKS for i in (0, 1))


@linux_only
def test_lazy_stage_reads_each_folder_once_and_keeps_only_residents_mapped(pipes, tmp_path):
    pipe = pipes["flux2"]
    cfg = pipe.dit.config
    folders = []
    for i in range(4):
        torch.manual_seed(20 + i)
        model = ScalarKV(
            ScalarKVConfig(block_names=("single_0",), heads=cfg.num_heads, head_dim=cfg.head_dim, length=256)
        )
        folders.append(save_declarative(tmp_path / f"s{i}", model))
    store = HostStore()
    lazy = TemplatePipeline.from_pretrained(
        folders, torch_dtype=torch.float32, device="cpu", lazy_loading=True, max_resident=2,
        memo_size=0, host_store=store,
    )  # fmt: skip
    inputs = [{"model_id": i, "scale": 0.2 * i} for i in (0, 1, 2, 3, 1)]
    reads = {f: DISK_READS[str(f.resolve())] for f in folders}
    merged = [lazy.prepare(pipe, inputs, prompt="a", cfg_scale=1.0)["kv_cache"] for _ in range(3)]
    assert all(DISK_READS[str(f.resolve())] - reads[f] == 1 for f in folders)  # parsed once
    assert all(store.disk_loads[str(f.resolve())] == 1 for f in folders)
    stats = lazy.scheduler.stats
    assert stats.max_resident == 2 and all(len(r) <= 2 for _, r in stats.residency_log)
    assert all(stats.to_device[f"s{i}"] == 3 for i in range(4))  # grouped: once per call each
    assert not lazy.scheduler.resident
    # after the call nothing of the lazy store is resident: every template was handed back
    assert all(mapped_rss_kib(f / "model.safetensors") == 0 for f in folders)
    # the same caches every call, and the same as eagerly loaded, always resident templates
    eager = TemplatePipeline.from_pretrained(
        folders, torch_dtype=torch.float32, device="cpu", host_store=HostStore()
    )
    reference = eager.prepare(pipe, inputs, prompt="a", cfg_scale=1.0)["kv_cache"]
    for cache in merged:
        assert all(torch.equal(cache[n][i], reference[n][i]) for n in reference for i in (0, 1))


def test_finite_check_fast_path_is_exact():
    x = torch.randn(4096)
    assert nonfinite_names({"x": x}) == []
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            y = x.to(dtype)
            y[17] = bad
            assert nonfinite_names({"y": y}) == ["y"], (bad, dtype)
    # finite values whose sum overflows are not flagged (the elementwise test decides)
    assert nonfinite_names({"big": torch.full((64,), 3e38), "half": torch.full((4096,), 6e4).half()}) == []


def test_merging_as_outputs_arrive_equals_merging_at_the_end(pipes, tmp_path):
    """Memo off, KV is merged as each output arrives: the caches equal the ordinary merge's
    (``merge_kv_caches``) bit for bit, with templates of other blocks and lengths, batched outputs, a step window, both CFG
    sides, and inputs listed out of order."""
    pipe = pipes["flux2"]
    cfg = pipe.dit.config
    specs = [(("single_0", "single_1"), 8), (("single_1",), 3), (("double_0", "single_0"), 5)]
    folders = []
    for i, (blocks, length) in enumerate(specs):
        torch.manual_seed(40 + i)
        model = ScalarKV(
            ScalarKVConfig(block_names=blocks, heads=cfg.num_heads, head_dim=cfg.head_dim, length=length)
        )
        folders.append(save_declarative(tmp_path / f"m{i}", model))
    positive = [
        {"model_id": 2, "scale": 0.1, "strength": 0.5},
        {"model_id": 0, "scale": 0.2},
        {"model_id": 1, "scale": 0.3, "step_end": 0.5},
        {"model_id": 0, "scale": 0.4, "strength": 2.0},
        {"model_id": 1, "scale": 0.6},
        {"model_id": 2, "scale": 0.9, "strength": 0.0},
    ]
    negative = [{"model_id": 1, "scale": 0.7}, {"model_id": 2, "scale": 0.8}]
    call = dict(prompt=["a", "b"], cfg_scale=3.0)
    tp = TemplatePipeline.from_pretrained(
        folders, torch_dtype=torch.float32, device="cpu", lazy_loading=True, memo_size=0, host_store=HostStore(),
    )  # fmt: skip
    streamed = tp.prepare(pipe, positive, negative, **call)
    ordinary = ordinary_merge(tp, pipe, positive, negative, call["cfg_scale"])
    assert ordinary.keys() == {"kv_cache", "negative_kv_cache"} and streamed.keys() >= ordinary.keys()
    a, b = streamed["negative_kv_cache"], ordinary["negative_kv_cache"]
    assert a.keys() == b.keys() and all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n]))
    a, b = streamed["kv_cache"], ordinary["kv_cache"]  # a step window: scheduled caches, entry by entry
    assert len(a.entries) == len(b.entries) == 2
    for (ca, sa, ea), (cb, sb, eb) in zip(a.entries, b.entries):
        assert (sa, ea) == (sb, eb) and ca.keys() == cb.keys()
        assert all(len(ca[n]) == len(cb[n]) for n in ca)
        assert all(torch.equal(x, y) for n in ca for x, y in zip(ca[n], cb[n]))  # bias entries too
    lengths = {n: entry[0].shape[1] for n, entry in a.entries[0][0].items()}
    assert lengths == {"double_0": 5, "single_0": 8 + 8 + 5, "single_1": 8 + 8 + 3}


def test_block_buffer_grows_in_batch_and_length_like_broadcast_cat():
    from diffsynth_templates.pipelines.kv_schedule import broadcast_cat
    from diffsynth_templates.templates.stream_merge import BlockBuffer

    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(b, n, 2, 4, generator=g) for b, n in ((1, 3), (2, 5), (1, 2), (2, 7))]
    buffer = BlockBuffer(chunks[0], capacity=4)  # too small on purpose: it must grow
    for i, c in enumerate(chunks):
        buffer.add((c, -c), spare=0 if i < 2 else 1)
    k, v = buffer.result()
    assert torch.equal(k, broadcast_cat(chunks, 1)) and torch.equal(v, -broadcast_cat(chunks, 1))
