"""Fine-tuning a published template (issue 25: the toy structure template's second phase starts from
its packaged folder): the checkpoints hold new weights, so they must not carry the start's digests."""

from __future__ import annotations

import json

import tests.training.archs  # noqa: F401  registers the test architectures
from diffsynth_templates.hub.package import package_template
from diffsynth_templates.templates import load_template_folder
from diffsynth_templates.training.config import parse_args
from diffsynth_templates.training.trainer import run
from tests.training.helpers import SMALL


def config(*args):
    return parse_args([str(a) for a in args])


def test_a_checkpoint_trained_from_a_packaged_template_loads(base_model, dataset, tmp_path):
    common = ["--model", base_model, "--dataset_metadata_path", dataset, *SMALL, "--max_steps", 1]
    first = run(config("--task", "full", "--output_path", tmp_path / "a", "--architecture", "test_scalar_kv",
                       "--learning_rate", 0.05, *common))  # fmt: skip
    packaged = package_template(first.checkpoint, tmp_path / "pkg", repo_id="toy/scalar")
    assert "sha256" in json.loads((packaged / "template.json").read_text())  # the start pins its digests
    second = run(config("--task", "full", "--output_path", tmp_path / "b", "--template", packaged,
                        "--learning_rate", 0.05, *common))  # fmt: skip
    spec = json.loads((second.checkpoint / "template.json").read_text())
    assert "sha256" not in spec
    load_template_folder(second.checkpoint)  # verified like any folder: no stale digest to fail on
    package_template(second.checkpoint, tmp_path / "pkg2", repo_id="toy/scalar")
