"""Training arguments: flags over config files over defaults, and clear errors for bad ones."""

from __future__ import annotations

import pytest

import train
from diffsynth_templates.training.config import ConfigError, TrainConfig, parse_args

BASE = ["--model", "m", "--output_path", "out", "--max_steps", "3"]


def test_defaults_and_comma_lists():
    config = parse_args(["--task", "train", "--cache_path", "c", *BASE, "--architecture", "value_kv",
                         "--trainable_models", "template, dit_lora", "--lora_target_modules", "to_q,to_k"])  # fmt: skip
    assert config.trainable_models == ["template", "dit_lora"]
    assert config.lora_target_modules == ["to_q", "to_k"]
    assert config.learning_rate == 1e-4 and config.batch_size == 1 and config.mixed_precision == "no"
    assert config.max_grad_norm == 1.0


def test_max_grad_norm_zero_turns_clipping_off():
    args = ["--task", "train", "--cache_path", "c", *BASE, "--architecture", "value_kv"]
    assert parse_args([*args, "--max_grad_norm", "0"]).max_grad_norm is None
    assert parse_args([*args, "--max_grad_norm", "0.5"]).max_grad_norm == 0.5
    with pytest.raises(ConfigError, match="or 0 for no clipping"):
        parse_args([*args, "--max_grad_norm", "-1"])


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "run.json").write_text('{"task": "train", "cache_path": "c", "model": "m", "output_path": "o", '
                                       '"num_epochs": 4, "learning_rate": 0.001, "architecture": "value_kv"}')  # fmt: skip
    config = parse_args(["--config", str(tmp_path / "run.json"), "--learning_rate", "0.01"])
    assert config.learning_rate == 0.01 and config.num_epochs == 4
    (tmp_path / "bad.yaml").write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown keys \['learning_rat'\]"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "train", *BASE, "--architecture", "a"], "needs --cache_path"),
        (["--task", "full", *BASE, "--architecture", "a"], "--dataset_metadata_path"),
        (["--task", "train", "--cache_path", "c", "--output_path", "o", "--max_steps", "1", "--architecture", "a"], "pass --model"),
        (["--task", "train", "--cache_path", "c", "--model", "m", "--output_path", "o", "--architecture", "a"], "--num_epochs or --max_steps"),
        (["--task", "train", "--cache_path", "c", *BASE], "needs a template"),
        (["--task", "train", "--cache_path", "c", *BASE, "--trainable_models", "dit,template", "--architecture", "a"], "cannot be combined"),
        (["--task", "train", "--cache_path", "c", *BASE, "--trainable_models", "lora"], r"\['lora'\] unknown"),
        (["--task", "train", "--cache_path", "c", *BASE, "--architecture", "a", "--template", "t"], "not both"),
        (["--task", "train", "--cache_path", "c", *BASE, "--architecture", "a", "--architecture_config", "{bad"], "not valid JSON"),
        (["--task", "train", "--cache_path", "c", *BASE, "--template", "t", "--architecture_config", '{"length": 4}'], "configures a fresh --architecture"),
        (["--task", "train", "--cache_path", "c", *BASE, "--architecture", "a", "--batch_size", "0"], "positive integer"),
        (["--task", "train", "--cache_path", "c", *BASE, "--architecture", "a", "--validation_steps", "5"], "go together"),
        (["--task", "train", "--cache_path", "c", *BASE, "--architecture", "a", "--validation_steps", "5",
          "--validation_inputs", '[{"seed": 1}]'], "needs a 'prompt'"),
        (["--task", "data_process", "--cache_path", "c", "--model", "m", "--dataset_metadata_path", "d",
          "--architecture", "a", "--resume", "auto"], "resumes by itself"),
    ],
)  # fmt: skip
def test_bad_arguments_say_what_to_do(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(args)


def test_cli_reports_bad_arguments_without_a_traceback(capsys):
    assert train.main(["--task", "train", "--model", "m", "--architecture", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--cache_path" in err and "Traceback" not in err


def test_json_round_trip():
    config = parse_args(["--task", "train", "--cache_path", "c", *BASE, "--architecture", "a", "--architecture_config", '{"length": 4}'])  # fmt: skip
    assert TrainConfig.from_dict(config.to_json()) == config
