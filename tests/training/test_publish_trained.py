"""A checkpoint written by train.py publishes (dry run) into a package that loads and generates."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from diffsynth_templates.__main__ import main as cli
from diffsynth_templates.hub.card import read_input_table
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.templates import TemplatePipeline
from diffsynth_templates.templates.residency import HostStore
from diffsynth_templates.templates.zoo.value_kv import ValueKVConfig
from tests.training.helpers import SMALL, run_cli


def test_trained_checkpoint_publishes_dry_run(base_model, dataset, tmp_path, capsys):
    config = json.dumps(asdict(ValueKVConfig.tiny()))
    out = tmp_path / "run"
    result = run_cli(["--task", "full", "--model", str(base_model), "--dataset_metadata_path", str(dataset), *SMALL,
                      "--architecture", "value_kv", "--architecture_config", config, "--data_processor", "brightness",
                      "--output_path", str(out), "--max_steps", "2", "--learning_rate", "0.01"])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "training_state").is_dir()

    package = tmp_path / "package"
    assert (
        cli(
            ["publish", str(checkpoint), "--repo", "alice/toy-brightness", "--dry-run", "--out", str(package)]
        )
        == 0
    )
    assert "dry run: would upload" in capsys.readouterr().out
    assert not (package / "training_state").exists()  # resume state is not published

    pipe = Flux2ImagePipeline.from_pretrained(base_model, device="cpu")
    call = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, seed=0, output_type="np", progress=False)  # fmt: skip
    templates = TemplatePipeline.from_pretrained([package], device="cpu", host_store=HostStore())
    image = templates(pipe, template_inputs=[{"scale": 0.8}], **call)
    assert np.isfinite(image).all() and np.abs(image - pipe(**call)).max() > 0
    rows = read_input_table((package / "README.md").read_text())
    assert [r["name"] for r in rows] == ["scale"] and rows[0]["range"] == "[0.0, 1.0]"
