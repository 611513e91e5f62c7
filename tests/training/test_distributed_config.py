"""``--import_modules`` imports (runs) Python modules, so like ``trust_remote_code`` it is accepted only on
the command line: a ``--config`` file that sets it is refused, naming the key (issue 26's trust leftover)."""

from __future__ import annotations

import pytest

from diffsynth_templates.training.config import ConfigError, parse_args


@pytest.mark.parametrize("text", ["import_modules: tests.training.archs\n", "--import-modules: [os]\n"])
def test_config_file_cannot_import_modules(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text("task: train\nmax_steps: 2\n" + text)
    with pytest.raises(ConfigError, match=r"sets 'import_modules'.*only on the command line"):
        parse_args(["--config", str(path)])


def test_json_config_file_cannot_import_modules(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"task": "train", "import_modules": "tests.training.archs"}')
    with pytest.raises(ConfigError, match="import_modules"):
        parse_args(["--config", str(path)])


def test_command_line_import_modules_with_a_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "task: train\nmax_steps: 2\ntrainable_models: dit\nmodel: m\ncache_path: c\noutput_path: o\n"
    )
    config = parse_args(["--config", str(path), "--import_modules", "tests.training.archs"])
    assert config.import_modules == ["tests.training.archs"] and config.max_steps == 2
