"""Every distributed mode trains the model one process trains (issue 26), on CPU with gloo.

Two processes with batch 1 each see, step by step, the samples one process with 2 accumulation steps
sees, and draw the same noise (the trainer seeds rank r's micro-batch m as micro-batch m * W + r), so
losses and final weights (and Adam's state) must agree within 1e-5 in: 2-process DDP (started as two
one-process "nodes" through scripts/train_multinode.sh), 2-process FSDP2 (killed after a checkpoint and
resumed), and 2-process DeepSpeed ZeRO-2 / ZeRO-3 on DeepSpeed's CPU accelerator (killed and resumed
too; skipped where deepspeed is not installed; on a GPU machine the same tests run, still on the CPU
accelerator).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tests.training.archs  # noqa: F401  registers the test architectures
from diffsynth_templates.backbones.flux2_dit import Flux2DiT
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.templates import TemplatePipeline
from diffsynth_templates.training.config import parse_args
from diffsynth_templates.training.metrics import read_metrics
from diffsynth_templates.training.trainer import FAULT_STEPS_ENV, run
from tests.training.helpers import REPO, SMALL, free_port, run_cli

TOLERANCE = 1e-5
STEPS = 3
TEMPLATE = ["--architecture", "test_scalar_kv", "--architecture_config", '{"block_names": ["double_0", "single_1"]}',
            "--data_processor", "brightness"]  # fmt: skip
# a template and a DiT LoRA at once (the template alone and the LoRA alone are subsets of this run)
TEMPLATE_AND_LORA = [*TEMPLATE, "--trainable_models", "template,dit_lora", "--lora_rank", "4",
                     "--lora_target_modules", "to_q,to_v"]  # fmt: skip
DIT = ["--trainable_models", "dit"]
TRAINED_FILES = ("model.safetensors", "dit_lora.safetensors", "training_state/dit_lora_raw.safetensors",
                 "transformer/diffusion_pytorch_model.safetensors", "training_state/optimizer.safetensors")  # fmt: skip
CALL = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, cfg_scale=1.0, seed=0, output_type="np", progress=False)  # fmt: skip

needs_deepspeed = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True).returncode != 0,
    reason="deepspeed is not installed (pip install -e .[deepspeed])",
)


def _args(base_model, cache: Path, output: Path, trained: list[str], *extra) -> list[str]:
    return [str(a) for a in ["--task", "train", "--model", base_model, "--cache_path", cache, "--output_path", output,
                             "--batch_size", 1, "--learning_rate", 0.01, "--max_steps", STEPS, *SMALL, *trained, *extra]]  # fmt: skip


@pytest.fixture(scope="module")
def caches(base_model, dataset, tmp_path_factory) -> dict[str, Path]:
    """Stage I once per trained set (a template needs its features; the DiT alone does not)."""
    root = tmp_path_factory.mktemp("dist_caches")
    out = {}
    for name, trained in (("template", TEMPLATE_AND_LORA), ("dit", DIT)):
        out[name] = root / name
        stage_one = ["--task", "data_process", "--model", base_model, "--dataset_metadata_path", dataset,
                     "--cache_path", out[name], *SMALL, *trained]  # fmt: skip
        run(parse_args([str(a) for a in stage_one]))
    return out


@pytest.fixture(scope="module")
def reference(base_model, caches, tmp_path_factory) -> dict[str, Path]:
    """The one-process runs every mode must equal: batch 1, 2 accumulation steps (the global batch of 2)."""
    root = tmp_path_factory.mktemp("dist_reference")
    out = {}
    for name, trained in (("template", TEMPLATE_AND_LORA), ("dit", DIT)):
        out[name] = root / name
        run(
            parse_args(
                _args(base_model, caches[name], out[name], trained, "--gradient_accumulation_steps", 2)
            )
        )
    return out


def _launch(config_file: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config_file),
            "--num_processes", "2", "--main_process_port", str(free_port())]  # fmt: skip


def _trained(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    latest = json.loads((run_dir / "latest.json").read_text())["checkpoint"]
    folder = run_dir / latest
    return {name: load_file(str(folder / name)) for name in TRAINED_FILES if (folder / name).is_file()}


def _losses(run_dir: Path) -> list[float]:
    return [float(row["loss"]) for row in read_metrics(run_dir / "logs" / "metrics.csv")]


def assert_same_training(run_dir: Path, reference_dir: Path) -> dict[str, float]:
    """Losses per step and every trained tensor (and Adam's state) within TOLERANCE; returns the gaps."""
    losses, expected = _losses(run_dir), _losses(reference_dir)
    assert len(losses) == len(expected) == STEPS
    gaps = {"loss": max(abs(a - b) for a, b in zip(losses, expected))}
    mine, theirs = _trained(run_dir), _trained(reference_dir)
    assert mine.keys() == theirs.keys()
    for name, tensors in theirs.items():
        assert mine[name].keys() == tensors.keys(), name
        gaps[name] = max((mine[name][k].float() - v.float()).abs().max().item() for k, v in tensors.items())
    print(f"{run_dir.name}: max |difference| {gaps}")  # the measured equivalence, shown with pytest -s
    assert max(gaps.values()) <= TOLERANCE, gaps
    return gaps


def _share(log: str, rank: int, kind: str) -> tuple[float, float]:
    """(MiB on this rank, MiB whole) from the trainer's "FSDP2 rank R holds ..." line."""
    match = re.search(rf"FSDP2 rank {rank} holds .*?{kind} ([0-9.]+) of ([0-9.]+) MiB", log)
    assert match, log[-3000:]
    return float(match.group(1)), float(match.group(2))


def _checked(result: subprocess.CompletedProcess, returncode: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == returncode, result.stderr[-6000:]
    return result


# --------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------


def test_fsdp2_killed_and_resumed_equals_one_process(base_model, caches, reference, tmp_path):
    """A template and a DiT LoRA under FSDP2: killed after step 2, resumed, equal to one process."""
    output = tmp_path / "fsdp2"
    args = _args(
        base_model, caches["template"], output, TEMPLATE_AND_LORA, "--save_steps", 1, "--resume", "auto"
    )
    env = {"ACCELERATE_USE_CPU": "1"}
    killed = run_cli(args, {**env, FAULT_STEPS_ENV: "2"}, _launch("scripts/accelerate_fsdp2.yaml"))
    assert killed.returncode != 0 and "exiting abruptly" in killed.stderr
    assert "FSDP2 on CPU (gloo): 2 processes" in killed.stderr
    assert "one shard group per DoubleStreamBlock, SingleStreamBlock" in killed.stderr
    # the frozen DiT is sharded too: rank 0 holds about half of it (shards are whole rows; rank 0 logs)
    mine, whole = _share(killed.stderr, 0, "frozen")
    assert whole > 0 and 0.4 < mine / whole < 0.6, (mine, whole)
    assert not (output / "checkpoint-3").exists()
    resumed = _checked(run_cli(args, env, _launch("scripts/accelerate_fsdp2.yaml")))
    assert "resumed from" in resumed.stderr and "checkpoint-2 at step 2" in resumed.stderr
    assert_same_training(output, reference["template"])

    # the checkpoint is a usable template folder and LoRA, like one process's
    pipe = Flux2ImagePipeline.from_pretrained(base_model, device="cpu")
    templates = TemplatePipeline.from_pretrained([output / "checkpoint-3"], device="cpu")
    lora = load_file(str(output / "checkpoint-3" / "dit_lora.safetensors"))
    image = templates(pipe, template_inputs=[{"scale": 0.5}], lora=lora, **CALL)
    assert image.shape == (1, 32, 32, 3)


def test_fsdp2_full_dit_with_gradient_checkpointing_equals_one_process(
    base_model, caches, reference, tmp_path
):
    """Full DiT fine-tuning, every block its own shard group, blocks recomputed in the backward pass."""
    output = tmp_path / "fsdp2_dit"
    args = _args(base_model, caches["dit"], output, DIT, "--use_gradient_checkpointing")
    _checked(run_cli(args, {"ACCELERATE_USE_CPU": "1"}, _launch("scripts/accelerate_fsdp2.yaml")))
    assert_same_training(output, reference["dit"])
    dit = Flux2DiT.from_pretrained(output / "checkpoint-3" / "transformer")
    assert sum(p.numel() for p in dit.parameters()) > 0


def test_fsdp2_mixed_precision_with_validation_images(base_model, dataset, tmp_path):
    """bf16 (frozen DiT in bf16, sharded), gradient checkpointing, features on the fly, and validation
    images rendered by the sharded DiT on both ranks."""
    output = tmp_path / "fsdp2_bf16"
    validation = json.dumps([{"prompt": "a red circle", "template_inputs": {"scale": 0.5}, "height": 32,
                              "width": 32, "num_inference_steps": 2}])  # fmt: skip
    args = [str(a) for a in ["--task", "full", "--model", base_model, "--dataset_metadata_path", dataset,
                             "--output_path", output, "--max_steps", 2, "--mixed_precision", "bf16",
                             "--use_gradient_checkpointing", "--validation_steps", 2, "--validation_inputs",
                             validation, *SMALL, *TEMPLATE]]  # fmt: skip
    result = _checked(run_cli(args, {"ACCELERATE_USE_CPU": "1"}, _launch("scripts/accelerate_fsdp2.yaml")))
    assert "FSDP2: compute in torch.bfloat16, gradients reduced in torch.float32" in result.stderr
    assert (output / "validation" / "step-2.png").is_file()
    weights = load_file(str(output / "checkpoint-2" / "model.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


# --------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO on its CPU accelerator
# --------------------------------------------------------------------------------------------------


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_killed_and_resumed_equals_one_process(stage, base_model, caches, reference, tmp_path):
    """ZeRO-2 / ZeRO-3 on DeepSpeed's CPU accelerator (gloo): killed after step 2 and resumed, the losses,
    weights and Adam state (gathered into one process's layout, no DeepSpeed checkpoint) equal one process's."""
    output = tmp_path / f"zero{stage}"
    args = _args(
        base_model, caches["template"], output, TEMPLATE_AND_LORA, "--save_steps", 1, "--resume", "auto"
    )
    launcher = _launch(f"scripts/accelerate_deepspeed_zero{stage}.yaml")
    env = {"DS_ACCELERATOR": "cpu"}
    killed = run_cli(args, {**env, FAULT_STEPS_ENV: "2"}, launcher)
    assert killed.returncode != 0 and "exiting abruptly" in killed.stderr, killed.stderr[-6000:]
    resumed = _checked(run_cli(args, env, _launch(f"scripts/accelerate_deepspeed_zero{stage}.yaml")))
    assert "checkpoint-2 at step 2" in resumed.stderr
    assert_same_training(output, reference["template"])


# --------------------------------------------------------------------------------------------------
# two "nodes" on localhost
# --------------------------------------------------------------------------------------------------


def test_two_nodes_on_localhost_train_like_one_process(base_model, caches, reference, tmp_path):
    """scripts/train_multinode.sh started twice (machine ranks 0 and 1, one process each): the script's
    rendezvous path, a 2-process DDP run over gloo, one checkpoint."""
    output = tmp_path / "two_nodes"
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1",
           "NUM_MACHINES": "2", "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": port, "GPUS_PER_NODE": "1"}  # fmt: skip
    args = _args(base_model, caches["template"], output, TEMPLATE_AND_LORA)
    nodes = [
        subprocess.Popen(
            ["bash", str(REPO / "scripts" / "train_multinode.sh"), *args],
            env={**env, "MACHINE_RANK": str(rank)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240) for node in nodes]
    for rank, (node, (_, stderr)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, stderr[-6000:]
        assert f"node {rank} of 2, main 127.0.0.1:{port}" in stderr
    assert [p.name for p in output.glob("checkpoint-*")] == ["checkpoint-3"]
    assert {p.name for p in (output / "checkpoint-3" / "training_state").glob("rng-rank*.json")} == {
        "rng-rank0.json",
        "rng-rank1.json",
    }
    assert_same_training(output, reference["template"])
