"""The toy world shipped in models/toy/: complete, small, declarative, loadable, and it draws.

Controllability itself is measured by ``scripts/eval_controls.py --quick --check`` (run by CI on these
same files); here the package's shape and the first command of the README are checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "models" / "toy"
sys.path.insert(0, str(ROOT / "scripts"))

from toy_tasks import TASKS  # noqa: E402

MAX_BYTES = 40 * 2**20


def test_shipped_toy_world_is_complete_and_under_40_mb():
    assert (TOY / "base" / "model_index.json").is_file(), "models/toy/base is missing"
    files = [f for f in TOY.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in files)
    assert total <= MAX_BYTES, f"models/toy holds {total / 2**20:.1f} MiB"
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".py")]
    for name in TASKS:
        folder = TOY / "templates" / name
        meta = json.loads((folder / "template.json").read_text())
        assert meta["architecture"] == TASKS[name].architecture
        # train_toy.sh publishes with this description: the shipped file must match what rebuilds it
        assert meta["description"] == TASKS[name].card_description()
        assert (folder / "README.md").read_text().strip(), f"{name} has no model card"
        assert list(folder.glob("*.safetensors")), f"{name} has no weights"


def test_shipped_templates_load_on_the_shipped_base_and_change_its_image():
    from diffsynth_templates.pipelines.auto import load_pipeline
    from diffsynth_templates.templates import TemplatePipeline

    pipe = load_pipeline(TOY / "base", device="cpu")
    prompt = "a large red circle at the center on a blue background"
    call = dict(prompt=prompt, height=64, width=64, num_inference_steps=8, seed=0, progress=False)
    base = np.asarray(pipe(**call, cfg_scale=1.0)[0], dtype=np.float64)
    assert base.shape == (64, 64, 3) and base.std() > 5  # an image, not a flat field
    tp = TemplatePipeline.from_pretrained([str(TOY / "templates" / "brightness")], device="cpu")
    dark = np.asarray(tp(pipe, template_inputs=[{"scale": 0.1}], cfg_scale=1.0, **call)[0], dtype=np.float64)
    bright = np.asarray(
        tp(pipe, template_inputs=[{"scale": 0.7}], cfg_scale=1.0, **call)[0], dtype=np.float64
    )
    assert dark.mean() + 40 < bright.mean(), (dark.mean(), bright.mean())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_template_records_the_shipped_base(name):
    meta = json.loads((TOY / "templates" / name / "template.json").read_text())
    assert meta.get("base_backbone") == "flux2", meta.get("base_backbone")
