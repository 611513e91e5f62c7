"""Hardening of the training loop: checkpoints through write-safety, finite values, validated resumption."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import train
from diffsynth_templates.loading.finite import NonFiniteError
from diffsynth_templates.loading.write_safety import MARKER, UnsafeOutputError
from diffsynth_templates.training import trainer
from diffsynth_templates.training.checkpoint import DamagedCheckpointError, ResumeError
from diffsynth_templates.training.config import parse_args
from diffsynth_templates.training.trainer import run
from tests.training.helpers import SMALL

SCALAR_KV = ["--architecture", "test_scalar_kv", "--architecture_config", '{"block_names": ["double_0", "single_1"]}',
             "--data_processor", "brightness"]  # fmt: skip


@pytest.fixture(scope="module")
def cache(base_model, dataset, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hardening") / "cache"
    run(parse_args([str(a) for a in ["--task", "data_process", "--model", base_model, "--dataset_metadata_path",
                                     dataset, "--cache_path", path, *SMALL, *SCALAR_KV]]))  # fmt: skip
    return path


def train_args(base_model, cache, output, *extra) -> list[str]:
    return [str(a) for a in ["--task", "train", "--model", base_model, "--cache_path", cache, "--output_path", output,
                             *SMALL, *SCALAR_KV, "--batch_size", 2, "--learning_rate", 0.01, *extra]]  # fmt: skip


def train_run(base_model, cache, output, *extra):
    return run(parse_args(train_args(base_model, cache, output, *extra)))


@pytest.fixture(scope="module")
def finished_run(base_model, cache, tmp_path_factory) -> Path:
    """Four steps with checkpoints at 2 and 4 (read-only: tests copy it)."""
    output = tmp_path_factory.mktemp("finished") / "run"
    train_run(base_model, cache, output, "--max_steps", 4, "--save_steps", 2)
    return output


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


# --------------------------------------------------------------------------------------------------
# case 1: checkpoints through write-safety
# --------------------------------------------------------------------------------------------------


def test_checkpoints_carry_the_marker_and_leave_no_staging_folder(finished_run):
    for name in ("checkpoint-2", "checkpoint-4"):
        assert (finished_run / name / MARKER).is_file()
    assert not [p.name for p in finished_run.iterdir() if p.name.startswith(".")]


def test_a_user_folder_named_like_a_checkpoint_is_never_replaced(base_model, cache, tmp_path):
    output = tmp_path / "run"
    (output / "checkpoint-2").mkdir(parents=True)
    (output / "checkpoint-2" / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match=r"checkpoint-2.*not written by diffsynth_templates"):
        train_run(base_model, cache, output, "--max_steps", 2)
    assert (output / "checkpoint-2" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-2"]  # refused before any step


def test_our_checkpoints_and_older_unmarked_ones_may_be_replaced(base_model, cache, finished_run, tmp_path):
    output = copy_run(finished_run, tmp_path)
    (output / "checkpoint-2" / MARKER).unlink()  # as written by an older version: recognised by its layout
    result = train_run(base_model, cache, output, "--max_steps", 2)
    assert result.checkpoint == output / "checkpoint-2" and (result.checkpoint / MARKER).is_file()


def test_pruning_removes_only_our_checkpoints(base_model, cache, tmp_path):
    output = tmp_path / "run"
    for name in ("checkpoint-0", "checkpoint-7"):  # steps this run never writes
        (output / name).mkdir(parents=True)
        (output / name / "data.bin").write_bytes(b"user data")
    result = train_run(
        base_model, cache, output, "--max_steps", 3, "--save_steps", 1, "--save_total_limit", 1
    )
    assert result.step == 3
    names = sorted(p.name for p in output.glob("checkpoint-*"))
    assert names == ["checkpoint-0", "checkpoint-3", "checkpoint-7"]
    assert (output / "checkpoint-0" / "data.bin").read_bytes() == b"user data"


def test_the_current_directory_as_output_path_keeps_the_users_files(base_model, cache, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    (work / ".checkpoint-notes").write_text("mine too")
    monkeypatch.chdir(work)
    result = train_run(base_model, cache, ".", "--max_steps", 2, "--save_steps", 1, "--save_total_limit", 1)
    assert result.step == 2 and (work / "checkpoint-2" / MARKER).is_file()
    assert (work / "keep.txt").read_text() == "mine" and (
        work / ".checkpoint-notes"
    ).read_text() == "mine too"
    (work / "latest.json").write_text('{"my": "own file"}')
    with pytest.raises(
        UnsafeOutputError, match=r"latest.json exists and was not written by diffsynth_templates"
    ):
        train_run(base_model, cache, ".", "--max_steps", 2)
    assert json.loads((work / "latest.json").read_text()) == {"my": "own file"}


# --------------------------------------------------------------------------------------------------
# case 2: finite values while training
# --------------------------------------------------------------------------------------------------


def _poison_sample(monkeypatch, sample_id: str) -> None:
    """One sample's loss becomes NaN (as a sample with broken features would make it)."""
    from diffsynth_templates.training.objective import TrainingModule

    forward = TrainingModule.forward

    def poisoned(self, batch, seeds):
        loss = forward(self, batch, seeds)
        return loss * float("nan") if any(f.id == sample_id for f in batch) else loss

    monkeypatch.setattr(TrainingModule, "forward", poisoned)


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_samples(
    base_model, cache, tmp_path, monkeypatch
):
    from diffsynth_templates.training.feature_cache import read_index

    ids = [s["id"] for s in read_index(cache)["samples"]]
    _poison_sample(monkeypatch, ids[0])
    output = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"the loss is nan at optimizer step \d+; non-finite for epoch 0 batch \d+: samples \[") as info:  # fmt: skip
        train_run(base_model, cache, output, "--max_steps", 3, "--save_steps", 1)
    assert repr(ids[0]) in str(info.value)
    step = int(str(info.value).split("optimizer step ")[1].split(";")[0])
    written = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*"))
    assert written == list(range(1, step))  # every step before the bad one, none from it on
    for n in written:
        assert all(torch.isfinite(t).all() for t in load_file(str(output / f"checkpoint-{n}" / "model.safetensors")).values())  # fmt: skip


def test_a_non_finite_gradient_stops_the_run_even_without_clipping(base_model, cache, tmp_path, monkeypatch):
    from diffsynth_templates.training.objective import TrainingModule

    forward = TrainingModule.forward

    def inf_gradient(self, batch, seeds):  # finite loss, infinite gradient
        loss = forward(self, batch, seeds)
        params = [p for p in self.parameters() if p.requires_grad]
        return loss + 0.0 * torch.sqrt(params[0].flatten()[0] * 0.0).sum()

    monkeypatch.setattr(TrainingModule, "forward", inf_gradient)
    with pytest.raises(
        NonFiniteError, match=r"the gradient norm is (nan|inf) at optimizer step 1 .*samples \["
    ):
        train_run(base_model, cache, tmp_path / "run", "--max_steps", 2, "--max_grad_norm", 0)
    assert not list((tmp_path / "run").glob("checkpoint-*"))


def test_a_checkpoint_with_non_finite_weights_is_refused_not_skipped(
    base_model, cache, tmp_path, monkeypatch
):
    monkeypatch.setattr(trainer, "_check_finite_step", lambda *args: None)  # only the save-time guard remains
    from diffsynth_templates.training.objective import TrainingModule

    forward = TrainingModule.forward

    def nan_weights(self, batch, seeds):
        with torch.no_grad():
            next(p for p in self.template.parameters()).fill_(float("nan"))
        return forward(self, batch, seeds)

    monkeypatch.setattr(TrainingModule, "forward", nan_weights)
    output = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"refusing to write .*checkpoint-1: the trained weights: tensor\(s\) \['template\."):  # fmt: skip
        train_run(base_model, cache, output, "--max_steps", 2, "--save_steps", 1)
    assert sorted(p.name for p in output.iterdir()) == ["logs"]  # no checkpoint, no staging folder


# --------------------------------------------------------------------------------------------------
# case 3: --resume refuses damaged checkpoints; auto falls back to the newest good one
# --------------------------------------------------------------------------------------------------


def _nan_weights(path: Path) -> None:
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "nan weights": ("model.safetensors", _nan_weights, "hold NaN or inf"),
    "truncated model": ("model.safetensors", _truncate, "cannot read"),
    "truncated optimizer": ("training_state/optimizer.safetensors", _truncate, "cannot read"),
    "nan optimizer": ("training_state/optimizer.safetensors", _nan_weights, "hold NaN or inf"),
    "state not json": ("training_state/state.json", lambda p: p.write_text("{garbage"), "not readable JSON"),
    "state a list": (
        "training_state/state.json",
        lambda p: p.write_text("[1, 2]"),
        "must hold a JSON object",
    ),
    "state wrong type": (
        "training_state/state.json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "step": "4"})),
        "'step' must be an integer",
    ),  # fmt: skip
    "state missing key": (
        "training_state/state.json",
        lambda p: p.write_text(
            json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "epoch"})
        ),
        "'epoch' must be an integer",
    ),  # fmt: skip
    "args not json": ("training_args.json", lambda p: p.write_bytes(b"\xff\x00"), "not readable JSON"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_from_a_damaged_checkpoint_is_refused_naming_the_file(
    base_model, cache, finished_run, tmp_path, damage
):
    output = copy_run(finished_run, tmp_path)
    name, spoil, message = DAMAGE[damage]
    spoil(output / "checkpoint-4" / name)
    with pytest.raises(DamagedCheckpointError, match=message) as info:
        train_run(base_model, cache, output, "--max_steps", 4, "--resume", output / "checkpoint-4")
    assert str(output / "checkpoint-4" / name) in str(info.value)


@pytest.mark.parametrize("damage", ["nan weights", "truncated optimizer", "state wrong type"])
def test_resume_auto_falls_back_to_the_newest_good_checkpoint(base_model, cache, finished_run, tmp_path, caplog, damage):  # fmt: skip
    output = copy_run(finished_run, tmp_path)
    name, spoil, message = DAMAGE[damage]
    spoil(output / "checkpoint-4" / name)
    caplog.set_level(logging.WARNING)
    result = train_run(base_model, cache, output, "--max_steps", 4, "--save_steps", 2, "--resume", "auto")
    assert result.step == 4 and len(result.losses) == 2  # resumed at step 2, redid 3 and 4
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipping" in warnings and str(output / "checkpoint-4" / name) in warnings and message in warnings
    assert "resumed from" in warnings and "checkpoint-2" in warnings
    # the redone checkpoint-4 replaced the damaged one and equals the undamaged original, bit for bit
    redone = load_file(str(output / "checkpoint-4" / "model.safetensors"))
    original = load_file(str(finished_run / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(redone[k], original[k]) for k in original)


def test_resume_auto_with_no_good_checkpoint_refuses_instead_of_restarting(base_model, cache, finished_run, tmp_path):  # fmt: skip
    output = copy_run(finished_run, tmp_path)
    _nan_weights(output / "checkpoint-4" / "model.safetensors")
    _truncate(output / "checkpoint-2" / "training_state" / "optimizer.safetensors")
    with pytest.raises(ResumeError, match=r"none of the 2 checkpoint\(s\).*checkpoint-4 .*checkpoint-2 .*another --output_path"):  # fmt: skip
        train_run(base_model, cache, output, "--max_steps", 4, "--resume", "auto")
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_train_py_reports_a_damaged_resume_without_a_traceback(
    base_model, cache, finished_run, tmp_path, capsys
):
    output = copy_run(finished_run, tmp_path)
    (output / "checkpoint-4" / "training_state" / "state.json").write_text("not json")
    code = train.main(
        train_args(base_model, cache, output, "--max_steps", 4, "--resume", output / "checkpoint-4")
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "state.json" in err and "Traceback" not in err


def test_an_unreadable_validation_image_fails_before_training(base_model, cache, tmp_path):
    from diffsynth_templates.training.config import ConfigError

    (tmp_path / "bad.png").write_bytes(b"not a png")
    inputs = json.dumps([{"prompt": "a red circle", "template_inputs": {"image": str(tmp_path / "bad.png")}}])
    with pytest.raises(ConfigError, match=r"bad.png'.*cannot be read"):
        train_run(base_model, cache, tmp_path / "run", "--max_steps", 2, "--validation_steps", 1,
                  "--validation_inputs", inputs)  # fmt: skip
    assert not (tmp_path / "run" / "checkpoint-1").exists()
