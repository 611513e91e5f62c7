"""benchmarks/compare_training.py, our side only (DiffSynth-Studio needs its own environment).

A tiny DiT, two 32x32 samples and three steps: stage I and stage II run in the benchmark's worker
processes, the sanity values come back, and the table lands in RESULTS.md's Training section without
touching the sections before it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from benchmarks.compare_training import build_setup, report, run_worker, summarize, write_section


def test_our_worker_trains_and_the_table_keeps_other_sections(tmp_path):
    args = argparse.Namespace(
        tiny=True, samples=2, size=32, kv_length=8, steps=3, seed=0, threads=1, gradient_checkpointing=True,
        repeats=1, note="",
    )  # fmt: skip
    spec = build_setup(tmp_path, args)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    results = {"ours": {}}
    for stage in ("data_process", "train"):
        results["ours"][stage] = [run_worker("ours", stage, sys.executable, tmp_path, "r0", None)]
    one, two = results["ours"]["data_process"][0], results["ours"]["train"][0]
    assert len(one["sample_ends"]) == 2 and one["loop_end"] >= one["sample_ends"][-1]
    assert len(two["step_seconds"]) == 2 and all(s > 0 for s in two["step_seconds"])
    assert len(two["losses"]) == 3 and all(math.isfinite(v) for v in two["losses"])
    assert two["weight_change"] > 0 and two["trainable_parameters"] > 0
    assert two["eval_after"] != two["eval_before"]
    assert two["peak_rss_mib"] >= two["peak_rss_steps_mib"] > 0

    table = report(args, summarize(results, args.samples), "")
    assert "| stage II s / step" in table and "not run" in table
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## Ours vs DiffSynth-Studio vs diffusers\n\n| a | b |\n")
    write_section(out, "Training", table)
    write_section(out, "Training", table)  # replaced, not appended twice
    text = out.read_text()
    assert text.startswith("# Benchmark results\n\n## Ours vs DiffSynth-Studio vs diffusers\n\n| a | b |\n")
    assert text.count("## Training") == 1
