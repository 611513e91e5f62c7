"""benchmarks/compare_reference.py, the part that needs only the main environment.

Ours and diffusers load the benchmark's model folder in their worker processes (the same JSON-lines
protocol the benchmark drives) and must give the same image from the same noise; the DiffSynth-format
template folder the benchmark writes must compute exactly what our declarative ``value_kv`` folder
computes. Everything that needs DiffSynth-Studio itself runs in the benchmark script, not here.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from benchmarks.compare_reference import WorkerProcess, build_model_folder, build_templates
from diffsynth_templates import Flux2DiTConfig
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.templates import load_template_folder

SIZE = 64
TINY_DIT = Flux2DiTConfig(
    num_double_blocks=1,
    num_single_blocks=2,
    num_heads=2,
    head_dim=16,
    text_dim=96,
    axes_dims_rope=(4, 4, 4, 4),
)


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-reference")
    build_model_folder(root / "model", TINY_DIT)
    templates = build_templates(root / "templates", TINY_DIT, 1, 8, "kv")
    spec = {"root": str(root / "model"), "templates": templates, "stage": templates}
    (root / "spec.json").write_text(json.dumps({**spec, "device": "cpu", "dtype": "float32"}))
    return root


def test_ours_matches_diffusers_in_the_benchmark_workers(bench_root, tmp_path):
    workers = {
        s: WorkerProcess(s, sys.executable, bench_root / "spec.json", tmp_path / f"{s}.log")
        for s in ("ours", "diffusers")
    }
    try:
        for w in workers.values():
            assert w.start(), w.error
        for cfg in (4.0, 1.0):
            for s, w in workers.items():
                out = w.call(
                    "denoise", size=SIZE, cfg=cfg, n_templates=0, steps=2, save=str(tmp_path / f"{s}.npy")
                )
                assert out["step_seconds"] > 0
            ours, theirs = np.load(tmp_path / "ours.npy"), np.load(tmp_path / "diffusers.npy")
            assert ours.shape == theirs.shape == (SIZE, SIZE, 3)
            assert np.abs(ours - theirs).max() <= 1e-3, f"cfg {cfg}"
            assert ours.std() > 0.01  # a real image, not a constant
        # with a template the image moves (the template runs are compared with DiffSynth in the script)
        workers["ours"].call(
            "denoise", size=SIZE, cfg=4.0, n_templates=1, steps=2, save=str(tmp_path / "kv.npy")
        )
        assert np.abs(np.load(tmp_path / "kv.npy") - ours).max() > 1e-3
        memory = workers["ours"].call("memory", reset=True)
        assert memory["peak_rss_mib"] >= memory["rss_mib"] > 0
    finally:
        for w in workers.values():
            w.close()


def test_diffsynth_format_template_equals_the_declarative_one(bench_root):
    folders = json.loads((bench_root / "spec.json").read_text())["templates"][0]
    ours = load_template_folder(folders["ours"], torch_dtype=torch.float32, device="cpu")
    theirs = load_template_folder(
        folders["diffsynth"], torch_dtype=torch.float32, device="cpu", trust_remote_code=True
    )
    pipe = Flux2ImagePipeline.from_pretrained(bench_root / "model", torch_dtype=torch.float32, device="cpu")
    caches = []
    for template in (ours, theirs):
        with torch.no_grad():
            caches.append(
                template.model(pipe=pipe, **template.model.process_inputs(pipe=pipe, scale=0.7))["kv_cache"]
            )
    assert sorted(caches[0]) == sorted(caches[1]) == ["double_0", "single_0", "single_1"]
    for block, (k, v) in caches[0].items():
        assert k.shape == (1, 8, TINY_DIT.num_heads, TINY_DIT.head_dim)
        assert torch.equal(k, caches[1][block][0]) and torch.equal(v, caches[1][block][1])
