"""Each run resolves each model source once (issue 21: "model folders are resolved four times per run").

A hub id's resolution is what costs (network, allow-pattern downloads), so stage I, stage II,
``--task full`` and ``infer.py`` resolve the model (and each component override, and each template)
at their entry point and pass the local folders down. The counter wraps ``resolve_model_path``
where every module of the package looks it up (its own module attribute), so a new caller that
resolves again is counted too.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import shutil
import sys
import types
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest

import diffsynth_templates
from diffsynth_templates.loading import resolve
from diffsynth_templates.templates.zoo import ValueKVConfig
from diffsynth_templates.training.config import parse_args
from diffsynth_templates.training.trainer import run
from tests.training.helpers import write_dataset

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "models" / "toy" / "base"
TEMPLATE = REPO / "models" / "toy" / "templates" / "brightness"
TINY = ["--max_pixels", "1024", "--max_sequence_length", "16", "--data_processor", "brightness"]


def _package_modules() -> list:
    """Every module of the package (imported now, so none binds the unwrapped function later)."""
    modules = []
    for info in pkgutil.walk_packages(diffsynth_templates.__path__, "diffsynth_templates."):
        if ".toy" in info.name:
            continue
        modules.append(importlib.import_module(info.name))
    return modules


@pytest.fixture
def resolutions(monkeypatch) -> Counter:
    """``{source as given: calls}`` for every ``resolve_model_path`` call made through the package."""
    calls: Counter = Counter()
    real = resolve.resolve_model_path

    def counting(source, **kwargs):
        calls[str(source)] += 1
        return real(source, **kwargs)

    for module in [*_package_modules(), resolve]:
        if getattr(module, "resolve_model_path", None) is real:
            monkeypatch.setattr(module, "resolve_model_path", counting)
    return calls


@pytest.fixture
def toy_copy(tmp_path_factory) -> Path:
    """The bundled toy model, copied (training writes nothing into it, but a copy keeps that certain)."""
    return Path(shutil.copytree(TOY, tmp_path_factory.mktemp("toy") / "base"))


def _common(model: Path, data: Path) -> list[str]:
    return ["--model", model, "--template", TEMPLATE, "--dataset_metadata_path", data, "--seed", 1, *TINY]


def _config(*args):
    return parse_args([str(a) for a in args])


def test_stage_one_resolves_the_model_and_template_once(resolutions, toy_copy, tmp_path):
    data = write_dataset(tmp_path / "data", prompts=["a red circle", "a blue square"])
    run(_config("--task", "data_process", "--cache_path", tmp_path / "cache", *_common(toy_copy, data)))
    assert resolutions == {str(toy_copy): 1, str(TEMPLATE): 1}


def test_stage_two_resolves_the_model_and_template_once(resolutions, toy_copy, tmp_path):
    data = write_dataset(tmp_path / "data", prompts=["a red circle", "a blue square"])
    common = _common(toy_copy, data)
    run(_config("--task", "data_process", "--cache_path", tmp_path / "cache", *common))
    resolutions.clear()
    run(_config("--task", "train", "--cache_path", tmp_path / "cache", "--output_path", tmp_path / "run",
                "--max_steps", 1, *common))  # fmt: skip
    assert resolutions == {str(toy_copy): 1, str(TEMPLATE): 1}


def test_full_run_resolves_the_model_and_template_once(resolutions, toy_copy, tmp_path):
    data = write_dataset(tmp_path / "data", prompts=["a red circle", "a blue square"])
    run(_config("--task", "full", "--output_path", tmp_path / "run", "--max_steps", 1,
                *_common(toy_copy, data)))  # fmt: skip
    assert resolutions == {str(toy_copy): 1, str(TEMPLATE): 1}


def test_component_override_is_resolved_once_too(resolutions, toy_copy, tmp_path):
    """``--vae`` from another folder: the model once, the override once."""
    vae = Path(shutil.copytree(toy_copy / "vae", tmp_path / "other" / "vae"))
    data = write_dataset(tmp_path / "data", prompts=["a red circle"])
    run(_config("--task", "full", "--output_path", tmp_path / "run", "--max_steps", 1, "--vae", vae.parent,
                *_common(toy_copy, data)))  # fmt: skip
    assert resolutions == {str(toy_copy): 1, str(vae.parent): 1, str(TEMPLATE): 1}


def test_infer_with_a_template_resolves_each_source_once(resolutions, toy_copy, tmp_path):
    sys.path.insert(0, str(REPO))
    import infer

    out = tmp_path / "out.png"
    infer.main(["--model", str(toy_copy), "--template", str(TEMPLATE), "--template_input", "scale=0.7",
                "--prompt", "a red circle", "--height", "32", "--width", "32", "--steps", "1",
                "--max_sequence_length", "16", "--output", str(out), "--quiet", "--device", "cpu"])  # fmt: skip
    assert out.is_file()
    assert resolutions == {str(toy_copy): 1, str(TEMPLATE): 1}


def test_zimage_stage_one_and_infer_resolve_the_model_once(resolutions, zimage_base, tmp_path):
    """Z-Image also reads its scheduler shift from the model folder: from the one resolution."""
    import infer

    data = write_dataset(tmp_path / "data", prompts=["a red circle"])
    run(_config("--task", "data_process", "--cache_path", tmp_path / "cache", "--model", zimage_base,
                "--dataset_metadata_path", data, "--max_pixels", 1024, "--max_sequence_length", 16, "--architecture",
                "value_kv", "--architecture_config", json.dumps(asdict(ValueKVConfig.tiny_zimage())),
                "--data_processor", "brightness"))  # fmt: skip
    assert resolutions == {str(zimage_base): 1}
    resolutions.clear()
    infer.main(["--model", str(zimage_base), "--prompt", "a red circle", "--height", "32", "--width", "32",
                "--steps", "1", "--max_sequence_length", "16", "--output", str(tmp_path / "z.png"), "--quiet",
                "--device", "cpu"])  # fmt: skip
    assert resolutions == {str(zimage_base): 1}


@pytest.fixture
def fake_hub(monkeypatch, toy_copy) -> list:
    """A ``modelscope`` whose ``snapshot_download`` serves the toy model for any id and records each call."""
    downloads: list = []

    def snapshot_download(source, revision=None, cache_dir=None, allow_patterns=None, local_files_only=False):
        downloads.append((source, sorted(allow_patterns or [])))
        return str(toy_copy)

    monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    return downloads


EVERYTHING = ["config.json", "generation_defaults.json", "model_index.json", "scheduler/*", "text_encoder/*",
              "tokenizer/*", "transformer/*", "vae/*"]  # fmt: skip


def test_a_hub_id_is_downloaded_once_per_run(fake_hub, tmp_path, monkeypatch):
    """What the counting is for: one download per run, asking for every file the run reads."""
    import infer

    monkeypatch.chdir(tmp_path)  # the download cache (models/downloads) lands here
    infer.main(["--model", "toy-owner/toy-base", "--prompt", "a red circle", "--height", "32", "--width", "32",
                "--steps", "1", "--max_sequence_length", "16", "--output", str(tmp_path / "x.png"), "--quiet",
                "--device", "cpu"])  # fmt: skip
    assert fake_hub == [("toy-owner/toy-base", EVERYTHING)]
    fake_hub.clear()
    data = write_dataset(tmp_path / "data", prompts=["a red circle"])
    run(_config("--task", "full", "--output_path", tmp_path / "run", "--max_steps", 1, "--model", "toy-owner/toy-base",
                "--template", TEMPLATE, "--dataset_metadata_path", data, "--seed", 1, *TINY))  # fmt: skip
    assert fake_hub == [("toy-owner/toy-base", EVERYTHING)]


def test_a_missing_component_is_named_before_anything_loads(toy_copy, tmp_path, capsys):
    """Resolving at the entry point checks every component first; the CLI prints our error, exit 2."""
    import infer

    shutil.rmtree(toy_copy / "vae")
    with pytest.raises(SystemExit) as exit_info:
        infer.main(
            ["--model", str(toy_copy), "--prompt", "x", "--output", str(tmp_path / "x.png"), "--quiet"]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "has no vae/ folder" in err and "vae=" in err
    assert not (tmp_path / "x.png").exists()
