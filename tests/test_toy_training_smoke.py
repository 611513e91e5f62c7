"""scripts/train_toy.sh end to end with tiny step counts (TOY_SMOKE=1): every stage of the toy world
runs with this repository's own tools and produces loadable, evaluated models."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("brightness", "color", "structure", "inpaint", "super_resolution", "sharpness")


def test_train_toy_smoke(tmp_path):
    env = {
        **os.environ,
        "TOY_SMOKE": "1",
        "TOY_DATA": str(tmp_path / "data"),
        "TOY_WORK": str(tmp_path / "work"),
        "TOY_OUT": str(tmp_path / "models"),
    }
    out = subprocess.run(["bash", "scripts/train_toy.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    models = tmp_path / "models"

    # the base model: the official layout, its DiT the one train.py saved (stored in bf16)
    index = json.loads((models / "base" / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline"
    latest = json.loads((tmp_path / "work" / "dit" / "latest.json").read_text())
    assert latest["step"] == 2

    # six declarative templates with model cards, trained by train.py for the smoke's 2 steps
    for task in TASKS:
        folder = models / "templates" / task
        spec = json.loads((folder / "template.json").read_text())
        assert spec["name"] == f"toy-{task}" and spec["base_backbone"] == "flux2", spec
        assert (folder / "README.md").is_file() and "sha256" in spec
        run = json.loads((tmp_path / "work" / "templates" / task / "run" / "latest.json").read_text())
        assert run["step"] == 2

    # color trained on its own copy of the dataset with a wider tint range: the same captions
    tint_copy = tmp_path / "data-tint0.5"
    read = lambda d: [json.loads(r) for r in (d / "metadata.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["prompt"] for r in read(tint_copy)] == [r["prompt"] for r in read(tmp_path / "data")]
    color_rows = read(tmp_path / "work" / "templates" / "color")
    assert [r["template_inputs"] for r in color_rows] == [
        dict(zip("RGB", r["mean_rgb"])) for r in read(tint_copy)
    ]

    # structure's second phase: fine-tuned from its published phase-1 folder with condition dropout, on
    # rows that carry a prompt not describing their layout; the shipped folder is the fine-tuned one
    structure = tmp_path / "work" / "templates" / "structure"
    assert (structure / "aligned" / "template.json").is_file()
    assert json.loads((structure / "finetune" / "latest.json").read_text())["step"] == 2
    finetune_rows = [json.loads(r) for r in (structure / "finetune.jsonl").read_text().splitlines()]
    assert all(r["prompt_unaligned"] != r["prompt"] for r in finetune_rows)
    fingerprint = json.loads((structure / "finetune-cache" / "index.json").read_text())["fingerprint"]
    assert (
        fingerprint["dataset"]["caption_dropout"] == 0.3 and fingerprint["dataset"]["unaligned_prompt"] == 0.5
    )
    args = json.loads((structure / "finetune" / "checkpoint-2" / "training_args.json").read_text())
    assert args["template"] == str(structure / "aligned") and args["caption_dropout"] == 0.3

    # the evaluation ran every template alone and composed, and wrote its table
    table = (models / "eval_controls.md").read_text()
    for task in TASKS:
        assert f"| {task} | alone |" in table, table
    assert "| structure | + brightness + sharpness |" in table
    assert (
        "| structure | foreign silhouette |" in table
        and "| structure | foreign silhouette, strength |" in table
    )
