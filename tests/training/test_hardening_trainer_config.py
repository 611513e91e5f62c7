"""Hardening of the training arguments: finite hyper-parameters, seeds in range, no trust from files, CLI errors."""

from __future__ import annotations

import json

import pytest

import train
from diffsynth_templates.errors import DiffSynthTemplatesError
from diffsynth_templates.training.config import MAX_SEED, ConfigError, parse_args

BASE = ["--task", "train", "--cache_path", "c", "--model", "m", "--output_path", "o", "--max_steps", "3",
        "--architecture", "a"]  # fmt: skip


@pytest.mark.parametrize("flag", ["--learning_rate", "--weight_decay", "--max_grad_norm", "--lora_alpha"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_flags_are_refused_naming_the_flag(flag, value):
    with pytest.raises(ConfigError, match=f"{flag} must be a finite number, got {value}"):
        parse_args([*BASE, f"{flag}={value}"])


@pytest.mark.parametrize("text", ["learning_rate: .nan\n", "weight_decay: .inf\n", 'learning_rate: "nan"\n'])
def test_non_finite_floats_in_a_config_file_are_refused(tmp_path, text):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match="must be a finite number"):
        parse_args([*BASE, "--config", str(tmp_path / "run.yaml")])


def test_a_yaml_learning_rate_written_as_text_is_read_as_a_number(tmp_path):
    (tmp_path / "run.yaml").write_text("learning_rate: 1e-4\n")  # YAML 1.1 reads this as a string
    assert parse_args([*BASE, "--config", str(tmp_path / "run.yaml")]).learning_rate == 1e-4
    (tmp_path / "bad.yaml").write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match="--learning_rate must be a number, got 'fast'"):
        parse_args([*BASE, "--config", str(tmp_path / "bad.yaml")])


@pytest.mark.parametrize("seed", [str(2**70), "x", "1.5", "-1", str(MAX_SEED + 1)])
def test_bad_seeds_on_the_command_line_name_the_value_and_the_range(seed):
    with pytest.raises(ConfigError, match=r"--seed must be an integer from 0 to 2\*\*63-1") as info:
        parse_args([*BASE, f"--seed={seed}"])
    assert repr(seed) in str(info.value) or seed in str(info.value)


@pytest.mark.parametrize("seed", [2**70, "x", 1.5, -3, True])
def test_bad_seeds_in_a_config_file_name_the_value_and_the_range(tmp_path, seed):
    (tmp_path / "run.json").write_text(json.dumps({"seed": seed}))
    with pytest.raises(ConfigError, match=r"--seed must be an integer from 0 to 2\*\*63-1"):
        parse_args([*BASE, "--config", str(tmp_path / "run.json")])


def test_the_largest_seed_is_accepted():
    assert parse_args([*BASE, "--seed", str(MAX_SEED)]).seed == MAX_SEED


@pytest.mark.parametrize("value", [True, False, "yes"])
@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_file_setting_trust_remote_code_is_refused(tmp_path, value, suffix):
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps({"trust_remote_code": value, "learning_rate": 0.001}))  # JSON is valid YAML
    with pytest.raises(ConfigError, match=r"sets 'trust_remote_code'.*command line") as info:
        parse_args([*BASE, "--config", str(path)])
    assert str(path) in str(info.value)


def test_a_json_argument_file_setting_trust_remote_code_is_refused(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"length": 4, "nested": [{"trust-remote-code": 1}]}))
    with pytest.raises(ConfigError, match=r"--architecture_config .*arch.json sets 'trust-remote-code'"):
        parse_args([*BASE, "--architecture_config", str(path)])


def test_wrongly_typed_config_file_values_are_config_errors(tmp_path):
    for text, message in [
        ('{"save_steps": "many"}', "--save_steps must be an integer, got 'many'"),
        ('{"offline": "yes"}', "--offline must be a bool"),
        ('{"tokenizer": 5}', "--tokenizer must be a str"),
        ('{"warmup_steps": 1.5}', "--warmup_steps must be an integer"),
    ]:
        (tmp_path / "run.json").write_text(text)
        with pytest.raises(ConfigError, match=message):
            parse_args([*BASE, "--config", str(tmp_path / "run.json")])
    (tmp_path / "latin1.json").write_bytes('{"tokenizer": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8"):
        parse_args([*BASE, "--config", str(tmp_path / "latin1.json")])


def test_argparse_errors_are_config_errors():
    with pytest.raises(ConfigError, match="invalid int value: 'x'"):
        parse_args([*BASE, "--max_steps", "x"])
    with pytest.raises(ConfigError, match="unrecognized arguments: --bogus"):
        parse_args([*BASE, "--bogus", "1"])


def test_train_py_prints_our_errors_without_a_traceback_and_exits_2(capsys, tmp_path):
    assert train.main([*BASE, "--seed", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seed must be an integer") and "Traceback" not in err
    # an error raised while running (not parsing) goes the same way
    missing = tmp_path / "no-such-cache"
    args = ["--task", "train", "--cache_path", str(missing), "--model", str(tmp_path / "no-model"),
            "--output_path", str(tmp_path / "o"), "--max_steps", "1", "--trainable_models", "dit"]  # fmt: skip
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_config_error_is_one_of_ours():
    assert issubclass(ConfigError, DiffSynthTemplatesError)
