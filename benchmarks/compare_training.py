"""Training side by side: our two-stage trainer vs DiffSynth-Studio's split training, same template task.

    python benchmarks/compare_training.py --diffsynth-python /work/venv-ref/bin/python \\
        --diffsynth-repo DiffSynth-Studio [--quick]
    python benchmarks/compare_training.py --steps 12 --repeats 3 --out benchmarks/RESULTS.md

One random-weight FLUX.2-klein folder (8 heads x 64, 2 double + 6 single blocks; written by our
``Flux2ImagePipeline.save_pretrained``, adapted for DiffSynth as in ``compare_reference.py``), one
dataset (``--samples`` procedural 256x256 images, prompts, and a brightness value per image in
``template_inputs``: one ``metadata.jsonl`` both trainers read as it is) and one brightness-style KV
template: our ``value_kv`` with one ``scale`` value, which has exactly the parameter layout of
DiffSynth's brightness example, saved once with seeded weights and given to both (our declarative
folder via ``--template``; the same ``model.safetensors`` behind a DiffSynth ``model.py`` with a
pass-through ``TEMPLATE_DATA_PROCESSOR``). Both train it from the same initial weights with AdamW
(lr 1e-4, weight decay 0.01, constant schedule, no gradient clipping: DiffSynth has none; ours
gets ``max_grad_norm = None`` in the worker, as no flag can say so), batch 1, float32 on the CPU, 512 prompt tokens,
``--kv-length`` KV tokens per block, and gradient checkpointing of the DiT blocks (as in both
projects' example scripts; ``--no-gradient-checkpointing`` switches it off in both).

Each run is its own process (so peak RSS is per system and per stage); runs are interleaved
(ours, DiffSynth, ours, DiffSynth, ...) and medians are taken over ``--repeats``:

1. stage I: ours ``train.py --task data_process``; DiffSynth ``examples/flux2/model_training/train.py
   --task sft:data_process`` (text encoder + VAE + the template's ``process_inputs``). Seconds per
   sample = (end of the processing loop - end of the first sample) / (samples - 1): model loading and
   the first sample are not counted; the loop's writes are (ours: content store + shard; DiffSynth:
   one ``torch.save`` per sample);
2. stage II: ours ``--task train --max_steps N``; DiffSynth ``--task sft:train`` from its cache,
   stopped after N optimizer steps. Seconds per step: median over steps 2..N of the time between
   consecutive step ends (data loading, template forward, DiT forward/backward, AdamW step).

Peak RSS: ``VmHWM`` of the stage's whole process (loading included) and, for stage II, from just
before the first step (models loaded) to the end (both save the trained template once, at step N:
ours its checkpoint, DiffSynth through its ``ModelLogger.save_model``).

Sanity (do both really train the same thing?): each worker evaluates, before its first step and after
its last, the unweighted flow-matching MSE on the dataset's first sample at fixed sigmas with a fixed
noise tensor, through its own DiT, its own template forward and its own stage-I features. The values
before training must agree (same model, template, features; the table shows the difference); after
training both move. The table also gives the training loss (unweighted MSE; DiffSynth's reported
loss divided by its timestep weight) over the first and last quarter of the steps, the number of
trainable parameters, and the relative change of the template's weights.

How DiffSynth is run: its real training script (``examples/flux2/model_training/train.py``, not part
of the PyPI package) from a DiffSynth-Studio checkout (``--diffsynth-repo``: a work tree, or a git
directory read with ``git show``; ``--diffsynth-train-script`` for the file itself), executed with
``runpy`` as ``__main__`` inside a worker in ``--diffsynth-python``. The worker first (a) lets
torchvision import without its C++ ops and registers the small model's checkpoint hashes (both from
``compare_reference.py``), (b) makes ``Flux2ImagePipeline.from_pretrained`` use float32 (the script
hard-codes bfloat16), (c) wraps ``ModelLogger.on_step_end`` to time steps, record the loss and stop
after N steps, and ``FlowMatchScheduler.training_weight`` to record the weight of each step's timestep.
Nothing else of DiffSynth's code path is touched. The reference environment::

    python -m venv --system-site-packages /work/venv-ref
    /work/venv-ref/bin/pip install --no-deps torchvision==0.28.0 diffsynth==2.1.12
    /work/venv-ref/bin/pip install pandas
    git clone https://github.com/modelscope/DiffSynth-Studio   # for its examples/ training script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds results.py
import numpy as np
import torch
from compare_reference import (  # noqa: E402  (benchmarks/ is on sys.path above, run as a script or a module)
    allow_torchvision_without_cpp_ops,
    bench_dit_config,
    build_model_folder,
    build_templates,
    proc_status_kib,
    register_diffsynth_configs,
    reset_peak_rss,
)
from results import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = "examples/flux2/model_training/train.py"
DEFAULT_REPOS = ("DiffSynth-Studio", "../DiffSynth-Studio", "/work/.mirror/modelscope+DiffSynth-Studio/repo")
SYSTEMS = ("ours", "diffsynth")
LABELS = {"ours": "ours", "diffsynth": "DiffSynth-Studio"}
TEXT_TOKENS = 512  # DiffSynth always pads prompts to 512 tokens; ours gets --max_sequence_length 512
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01  # both trainers' default
EVAL_SIGMAS = (0.25, 0.5, 0.75)
EVAL_NOISE_SEED = 1234
COLORS = ("red", "green", "blue", "yellow", "white", "black")
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "right", "top", "bottom", "center")

# Appended to compare_reference's DiffSynth model.py: DiffSynth's trainer calls the folder's
# TEMPLATE_DATA_PROCESSOR on each row's template_inputs (its brightness example: scale passes through).
DATA_PROCESSOR_PY = """

class DataProcessor:
    def __call__(self, scale, **kwargs):
        return {"scale": scale}


TEMPLATE_DATA_PROCESSOR = DataProcessor
"""


# ------------------------------------------------------------------------------------------------
# the shared setup (controller, main environment)
# ------------------------------------------------------------------------------------------------


def write_dataset(root: Path, samples: int, size: int, seed: int = 0) -> Path:
    """Procedural images of varied brightness; ``template_inputs.scale`` is each image's mean brightness."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    for i in range(samples):
        coarse = rng.random((6, 6, 3))  # a smooth color field ...
        field = np.asarray(
            Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
            dtype=np.float32,
        )
        cx, cy, r = rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75), rng.uniform(0.1, 0.3)
        disk = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2)[..., None]  # ... with a flat disk on it
        image = np.where(disk, rng.random(3) * 255, field)
        image = np.clip(image * rng.uniform(0.2, 1.6), 0, 255).astype(np.uint8)  # the brightness
        Image.fromarray(image).save(root / "images" / f"{i}.png")
        prompt = (
            f"a photo of a {COLORS[i % len(COLORS)]} {SHAPES[i % len(SHAPES)]} "
            f"on the {PLACES[i % len(PLACES)]}"
        )
        scale = round(float(image.mean()) / 255, 4)
        rows.append({"image": f"images/{i}.png", "prompt": prompt, "template_inputs": {"scale": scale}})
    path = root / "metadata.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def find_train_script(args, tmp: Path) -> tuple[Path, str]:
    """DiffSynth-Studio's FLUX.2 training script and where it came from (file, or repository + commit)."""
    if args.diffsynth_train_script:
        return Path(args.diffsynth_train_script), str(args.diffsynth_train_script)
    candidates = [args.diffsynth_repo] if args.diffsynth_repo else list(DEFAULT_REPOS)
    for repo in map(Path, candidates):
        if (repo / TRAIN_SCRIPT).is_file():  # a work tree
            rev = subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
            return repo / TRAIN_SCRIPT, f"DiffSynth-Studio {rev or 'work tree'} `{TRAIN_SCRIPT}`"
        git = ["git", f"--git-dir={repo}"]
        shown = subprocess.run([*git, "show", f"{args.diffsynth_rev}:{TRAIN_SCRIPT}"], capture_output=True)
        if repo.is_dir() and shown.returncode == 0:  # a bare repository (or .git directory)
            rev = subprocess.run(
                [*git, "rev-parse", "--short=12", args.diffsynth_rev], capture_output=True, text=True
            ).stdout.strip()
            path = tmp / "diffsynth_flux2_train.py"
            path.write_bytes(shown.stdout)
            return path, f"DiffSynth-Studio {rev} `{TRAIN_SCRIPT}`"
    raise SystemExit(
        f"DiffSynth-Studio's {TRAIN_SCRIPT} not found (looked in {candidates}); clone "
        "https://github.com/modelscope/DiffSynth-Studio and pass --diffsynth-repo, or --no-diffsynth"
    )


def tiny_dit_config():
    """For smoke tests only (``--tiny``): 1 double + 2 single blocks of 2 heads x 16."""
    from diffsynth_templates import Flux2DiTConfig

    return Flux2DiTConfig(
        num_double_blocks=1, num_single_blocks=2, num_heads=2, head_dim=16, text_dim=96,
        axes_dims_rope=(4, 4, 4, 4),
    )  # fmt: skip


def describe_dit(dit) -> str:
    return (
        f"{dit.num_heads} heads x {dit.head_dim}, {dit.num_double_blocks} double + "
        f"{dit.num_single_blocks} single blocks"
    )


def build_setup(root: Path, args) -> dict[str, Any]:
    dit = tiny_dit_config() if args.tiny else bench_dit_config()
    build_model_folder(root / "model", dit)
    template = build_templates(root / "templates", dit, 1, args.kv_length, "brightness")[0]
    model_py = Path(template["diffsynth"]) / "model.py"
    model_py.write_text(model_py.read_text() + DATA_PROCESSOR_PY)
    metadata = write_dataset(root / "data", args.samples, args.size)
    return {
        "model": str(root / "model"),
        "template": template,
        "dataset": str(root / "data"),
        "metadata": str(metadata),
        "samples": args.samples,
        "size": args.size,
        "max_pixels": args.size * args.size,
        "kv_length": args.kv_length,
        "steps": args.steps,
        "seed": args.seed,
        "threads": args.threads,
        "gradient_checkpointing": args.gradient_checkpointing,
        "dtype": "float32",
        "dit": describe_dit(dit),
    }


# ------------------------------------------------------------------------------------------------
# what both workers share
# ------------------------------------------------------------------------------------------------


def eval_noise(size: int) -> torch.Tensor:
    """The fixed evaluation noise, packed as both trainers pack latents: ``[1, (h w), 128]``."""
    g = torch.Generator().manual_seed(EVAL_NOISE_SEED)
    noise = torch.randn(len(EVAL_SIGMAS), 1, 128, size // 16, size // 16, generator=g)
    return noise.flatten(3).transpose(2, 3)  # [sigmas, 1, h*w, 128]


def peak_rss_mib() -> float:
    return proc_status_kib("VmHWM") / 1024


def params_snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in params]


def relative_change(before: list[torch.Tensor], params: list[torch.Tensor]) -> float:
    num = sum(float((p.detach().float() - b).square().sum()) for b, p in zip(before, params))
    den = sum(float(b.square().sum()) for b in before)
    return math.sqrt(num / den) if den else float("nan")


# ------------------------------------------------------------------------------------------------
# our worker (main environment)
# ------------------------------------------------------------------------------------------------


def ours_args(spec: dict, stage: str, cache: Path, output: Path) -> list[str]:
    args = ["--task", stage, "--model", spec["model"], "--template", spec["template"]["ours"],
            "--dataset_base_path", spec["dataset"], "--dataset_metadata_path", spec["metadata"],
            "--cache_path", str(cache), "--max_pixels", str(spec["max_pixels"]),
            "--max_sequence_length", str(TEXT_TOKENS), "--seed", str(spec["seed"])]  # fmt: skip
    if stage == "train":
        args += ["--output_path", str(output), "--max_steps", str(spec["steps"]), "--batch_size", "1",
                 "--learning_rate", str(LEARNING_RATE), "--weight_decay", str(WEIGHT_DECAY),
                 "--lr_scheduler", "constant"]  # fmt: skip
        if spec["gradient_checkpointing"]:
            args.append("--use_gradient_checkpointing")
    return args


def ours_eval(module, features, size: int) -> list[float]:
    """Unweighted MSE at the fixed sigmas and noise, through our template forward and DiT."""
    import dataclasses

    from diffsynth_templates.training.objective import TrainingContext

    noises = eval_noise(size)
    losses = []
    with torch.no_grad():
        context = TrainingContext(module.dit, module.device, module.dit_dtype)
        cache = module.template(pipe=context, **features.template)
        sample = module.objective.prepare(features, 0, cache, module.device)
        for sigma, noise in zip(EVAL_SIGMAS, noises):
            fixed = dataclasses.replace(sample, noise=noise, sigma=torch.tensor(sigma, dtype=torch.float32))
            prediction, target = module.objective.predict(module.dit, [fixed], fixed.kv or None)
            losses.append(float(torch.nn.functional.mse_loss(prediction.float(), target.float())))
    return losses


def ours_worker(spec: dict, stage: str, cache: Path, output: Path) -> dict[str, Any]:
    import diffsynth_templates.training.trainer as trainer
    from diffsynth_templates.training.config import parse_args
    from diffsynth_templates.training.feature_cache import open_cache

    out: dict[str, Any] = {}
    config = parse_args(ours_args(spec, stage, cache, output))
    # DiffSynth does not clip gradients. Ours clips at --max_grad_norm 1.0 by default, and neither a
    # flag nor a --config null can switch that off (None means "not given"), so it is switched off here.
    config.max_grad_norm = None
    if stage == "data_process":
        ends: list[float] = []
        add, close = trainer.ShardWriter.add, trainer.ShardWriter.close

        def timed_add(self, *a, **k):
            result = add(self, *a, **k)
            ends.append(time.perf_counter())
            return result

        def timed_close(self, *a, **k):
            result = close(self, *a, **k)
            out["loop_end"] = time.perf_counter()
            return result

        trainer.ShardWriter.add, trainer.ShardWriter.close = timed_add, timed_close
        result = trainer.run(config)
        if not result.complete or result.num_skipped:
            raise RuntimeError(f"stage I incomplete: {result}")
        out["sample_ends"] = ends
        return out

    captured: dict[str, Any] = {}

    def probe(model, optimizer) -> None:
        _, items = open_cache(config.cache_path)
        features = next(items[i] for i in range(len(items)) if items[i].order == 0)
        params = [p for p in model.parameters() if p.requires_grad]
        captured.update(module=model, features=features, params=params, before=params_snapshot(params))
        out["eval_before"] = ours_eval(model, features, spec["size"])
        out["trainable_parameters"] = sum(p.numel() for p in params)
        out["rss_loaded_mib"] = proc_status_kib("VmRSS") / 1024
        reset_peak_rss()  # from here: the steps (and the final checkpoint)

    result = trainer.run(config, on_model_built=probe)
    out["peak_rss_steps_mib"] = peak_rss_mib()
    from diffsynth_templates.training.metrics import read_metrics

    rows = read_metrics(Path(output) / "logs" / "metrics.csv")
    out["step_seconds"] = [float(r["seconds"]) for r in rows][1:]  # the trainer's own per-step wall time
    out["losses"] = list(result.losses)
    out["eval_after"] = ours_eval(captured["module"], captured["features"], spec["size"])
    out["weight_change"] = relative_change(captured["before"], captured["params"])
    return out


# ------------------------------------------------------------------------------------------------
# DiffSynth-Studio's worker (reference environment): its train.py, run as __main__
# ------------------------------------------------------------------------------------------------


class StopTraining(Exception):
    """Raised from the step-end hook after the requested number of steps."""


def diffsynth_eval(model, data: Any, size: int) -> list[float]:
    """Unweighted MSE at the fixed sigmas and noise, through DiffSynth's units, template and model_fn."""
    pipe = model.pipe
    noises = eval_noise(size)
    losses = []
    with torch.no_grad():
        inputs = model.transfer_data_to_device(data, pipe.device, pipe.torch_dtype)
        for unit in pipe.units:  # stage II's units: the template forward
            inputs = pipe.unit_runner(unit, pipe, *inputs)
        shared, posi, _ = inputs
        merged = {**shared, **posi, "use_gradient_checkpointing": False}
        x0 = merged["input_latents"]
        models = {name: getattr(pipe, name) for name in pipe.in_iteration_models}
        for sigma, noise in zip(EVAL_SIGMAS, noises):
            noise = noise.to(x0.device, x0.dtype)
            merged["latents"] = (1 - sigma) * x0 + sigma * noise
            timestep = torch.tensor([sigma * 1000], dtype=pipe.torch_dtype, device=pipe.device)
            prediction = pipe.model_fn(**models, **merged, timestep=timestep)
            losses.append(float(torch.nn.functional.mse_loss(prediction.float(), (noise - x0).float())))
    return losses


def diffsynth_args(spec: dict, stage: str, cache: Path, output: Path, files: dict[str, Any]) -> list[str]:
    args = ["--extra_inputs", "template_inputs", "--max_pixels", str(spec["max_pixels"]),
            "--template_model_id_or_path", spec["template"]["diffsynth"],
            "--tokenizer_path", str(Path(spec["model"]) / "tokenizer"),
            "--trainable_models", "template_model", "--remove_prefix_in_ckpt", "pipe.template_model.",
            "--learning_rate", str(LEARNING_RATE), "--weight_decay", str(WEIGHT_DECAY)]  # fmt: skip
    if spec["gradient_checkpointing"]:
        args.append("--use_gradient_checkpointing")
    if stage == "data_process":
        return args + ["--task", "sft:data_process", "--dataset_base_path", spec["dataset"],
                       "--dataset_metadata_path", spec["metadata"], "--dataset_repeat", "1",
                       "--model_paths", json.dumps([files["text_encoder"], files["vae"]]), "--output_path", str(cache)]  # fmt: skip
    repeat = math.ceil(spec["steps"] / spec["samples"])  # enough batches; the hook stops at N steps
    return args + ["--task", "sft:train", "--dataset_base_path", str(cache), "--dataset_repeat", str(repeat),
                   "--num_epochs", "1", "--model_paths", json.dumps([files["dit"]]), "--output_path", str(output)]  # fmt: skip


def diffsynth_worker(spec: dict, stage: str, cache: Path, output: Path, script: Path) -> dict[str, Any]:
    import runpy
    from importlib.metadata import version

    out: dict[str, Any] = {"torchvision": allow_torchvision_without_cpp_ops()}
    import diffsynth.diffusion as diffusion
    from diffsynth.diffusion.flow_match import FlowMatchScheduler
    from diffsynth.diffusion.logger import ModelLogger
    from diffsynth.pipelines.flux2_image import Flux2ImagePipeline

    out["diffsynth"] = version("diffsynth")
    dtype = getattr(torch, spec["dtype"])
    dit, vae, text_encoder = register_diffsynth_configs(Path(spec["model"]))  # its order
    files = {"dit": dit, "vae": vae, "text_encoder": text_encoder}
    argv = diffsynth_args(spec, stage, cache, output, files)

    # (b) the script hard-codes bfloat16: run it in the benchmark's precision
    from_pretrained = Flux2ImagePipeline.from_pretrained

    def in_precision(*a, **k):
        k["torch_dtype"] = dtype
        return from_pretrained(*a, **k)

    Flux2ImagePipeline.from_pretrained = staticmethod(in_precision)

    # (c) stamps, losses and the timestep weight of each step; stop after N steps
    ends, losses, weights = [], [], []
    training_weight = FlowMatchScheduler.training_weight

    def recorded_weight(self, timestep):
        weight = training_weight(self, timestep)
        weights.append(float(weight))
        return weight

    FlowMatchScheduler.training_weight = recorded_weight
    on_step_end = ModelLogger.on_step_end

    def stamped_step_end(self, accelerator, model, save_steps=None, **kwargs):
        ends.append(time.perf_counter())
        losses.append(float(kwargs["loss"].detach()))
        on_step_end(self, accelerator, model, save_steps, **kwargs)
        if len(ends) >= spec["steps"]:
            raise StopTraining

    ModelLogger.on_step_end = stamped_step_end

    launch_training = diffusion.launch_training_task

    def training_task(accelerator, dataset, model, model_logger, **kwargs):  # launch_training_task
        data = dataset.cached_data_operator(os.path.join(str(cache), "0", "0.pth"))  # the first row
        params = [p for p in model.parameters() if p.requires_grad]
        before = params_snapshot(params)
        out["trainable_parameters"] = sum(p.numel() for p in params)
        out["eval_before"] = diffsynth_eval(model, data, spec["size"])
        out["rss_loaded_mib"] = proc_status_kib("VmRSS") / 1024
        reset_peak_rss()
        try:
            launch_training(accelerator, dataset, model, model_logger, **kwargs)
        except StopTraining:  # save what was trained, as ours does at its last step (its own save code)
            model_logger.save_model(accelerator, model, f"step-{model_logger.num_steps}.safetensors")
        out["peak_rss_steps_mib"] = peak_rss_mib()
        out["eval_after"] = diffsynth_eval(model, data, spec["size"])
        out["weight_change"] = relative_change(before, params)

    saves: list[float] = []
    launch_data_process = diffusion.launch_data_process_task

    def data_process_task(*a, **k):
        save = torch.save

        def timed_save(*sa, **sk):
            save(*sa, **sk)
            saves.append(time.perf_counter())

        torch.save = timed_save
        try:
            launch_data_process(*a, **k)
        finally:
            torch.save = save

    # the script does `from diffsynth.diffusion import *`: it binds these wrappers
    diffusion.launch_training_task, diffusion.launch_data_process_task = training_task, data_process_task
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    if stage == "data_process":
        if len(saves) != spec["samples"]:
            raise RuntimeError(f"DiffSynth stage I wrote {len(saves)} of {spec['samples']} samples")
        out["sample_ends"], out["loop_end"] = saves, saves[-1]
    else:
        if len(ends) != spec["steps"]:
            raise RuntimeError(f"DiffSynth ran {len(ends)} of {spec['steps']} steps")
        out["step_seconds"] = [b - a for a, b in zip(ends, ends[1:])]
        out["losses"] = [loss / w for loss, w in zip(losses, weights)]  # unweighted MSE, as ours
        out["weighted_losses"] = losses
        out["timestep_weights"] = weights
    return out


def worker_main(args) -> None:
    spec = json.loads(Path(args.worker_spec).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])  # DiffSynth draws noise, timesteps and order from the global RNG
    start = time.perf_counter()
    cache, output = Path(args.worker_cache), Path(args.worker_output)
    if args.worker == "ours":
        out = ours_worker(spec, args.worker_stage, cache, output)
    else:
        out = diffsynth_worker(spec, args.worker_stage, cache, output, Path(args.worker_script))
    out["process_seconds"] = time.perf_counter() - start
    # VmHWM is max(the kernel's lazily updated high-water mark, the current RSS) at the moment it is
    # read, so a later read can be a little lower than an earlier one: the process peak includes the
    # steps' reading
    out["peak_rss_mib"] = max(peak_rss_mib(), out.get("peak_rss_steps_mib", 0.0))
    out["threads"] = torch.get_num_threads()
    out["dit"] = spec["dit"]
    Path(args.worker_result).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# controller
# ------------------------------------------------------------------------------------------------


def run_worker(system: str, stage: str, python: str, tmp: Path, run: str, script: Path | None) -> dict:
    cache = tmp / f"cache-{system}-{run}"
    output = tmp / f"out-{system}-{run}"
    result = tmp / f"result-{system}-{stage}-{run}.json"
    log = tmp / f"{system}-{stage}-{run}.log"
    shutil.rmtree(cache if stage == "data_process" else output, ignore_errors=True)  # a reused --workdir
    cmd = [python, os.path.abspath(__file__), "--worker", system, "--worker-stage", stage,
           "--worker-spec", str(tmp / "spec.json"), "--worker-cache", str(cache),
           "--worker-output", str(output), "--worker-result", str(result)]  # fmt: skip
    if script is not None:
        cmd += ["--worker-script", str(script)]
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    env["TOKENIZERS_PARALLELISM"] = "false"
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tmp, env=env).returncode
    if code != 0 or not result.is_file():
        raise RuntimeError(f"{system} {stage} failed (exit {code}); its log ends:\n{log.read_text()[-4000:]}")
    out = json.loads(result.read_text())
    print(f"  {system} {stage} ({run}): {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return out


def summarize(results: dict[str, dict[str, list[dict]]], samples: int) -> dict[str, dict[str, Any]]:
    """Per system: medians over repeats of each measure, and the first repeat's sanity values."""
    table: dict[str, dict[str, Any]] = {}
    for system, stages in results.items():
        one, two = stages["data_process"], stages["train"]
        per_sample = [(r["loop_end"] - r["sample_ends"][0]) / (samples - 1) for r in one]
        steps = [statistics.median(r["step_seconds"]) for r in two]
        first = two[0]
        quarter = max(1, len(first["losses"]) // 4)
        table[system] = {
            "stage1_s_per_sample": statistics.median(per_sample),
            "stage1_process_s": statistics.median(r["process_seconds"] for r in one),
            "stage1_peak_rss": statistics.median(r["peak_rss_mib"] for r in one),
            "stage2_s_per_step": statistics.median(steps),
            "stage2_runs": steps,
            "stage2_process_s": statistics.median(r["process_seconds"] for r in two),
            "stage2_peak_rss": statistics.median(r["peak_rss_mib"] for r in two),
            "stage2_peak_rss_steps": statistics.median(r["peak_rss_steps_mib"] for r in two),
            "stage2_rss_loaded": statistics.median(r["rss_loaded_mib"] for r in two),
            "trainable_parameters": first["trainable_parameters"],
            "eval_before": statistics.mean(first["eval_before"]),
            "eval_after": statistics.mean(first["eval_after"]),
            "eval_before_all": first["eval_before"],
            "loss_first": statistics.mean(first["losses"][:quarter]),
            "loss_last": statistics.mean(first["losses"][-quarter:]),
            "weight_change": first["weight_change"],
            "threads": first["threads"],
            "info": {k: first[k] for k in ("diffsynth", "torchvision") if k in first},
            "dit": first["dit"],
        }
    return table


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** -(digits - 1) or value == 0 else f"{value:.2e}"


def ratio(ours: float | None, theirs: float | None) -> str:
    return "n/a" if ours is None or theirs is None or theirs == 0 else f"{ours / theirs:.2f}"


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"CPU {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({threads} thread(s) per "
        f"worker), cpu float32, Python {platform.python_version()}"
    )


def report(args, table: dict[str, dict[str, Any]], source: str) -> str:
    systems = [s for s in SYSTEMS if s in table]
    rows = []

    def row(name: str, key: str, digits: int = 4, with_ratio: bool = True) -> None:
        values = {s: table[s][key] for s in systems}
        cols = [fmt(values.get(s), digits) if s in values else "not run" for s in SYSTEMS]
        r = ratio(values.get("ours"), values.get("diffsynth")) if with_ratio else "-"
        rows.append(f"| {name} | {' | '.join(cols)} | {r} |")

    row("stage II s / step (median of steps 2..N)", "stage2_s_per_step")
    row("stage I s / sample (loading and first sample excluded)", "stage1_s_per_sample")
    row("peak RSS MiB, stage II process", "stage2_peak_rss", 0)
    row("RSS MiB, stage II, models loaded (before step 1)", "stage2_rss_loaded", 0)
    row("peak RSS MiB, stage II, from step 1 to the end", "stage2_peak_rss_steps", 0)
    row("peak RSS MiB, stage I process", "stage1_peak_rss", 0)
    row("stage II process s (imports, loading, N steps, saving)", "stage2_process_s", 1)
    row("stage I process s (imports, loading, all samples)", "stage1_process_s", 1)
    row("trainable parameters", "trainable_parameters", with_ratio=False)
    row("eval MSE before training (first sample, fixed sigmas + noise)", "eval_before", 6, False)
    row("eval MSE after N steps", "eval_after", 6, False)
    row("training MSE, mean of the first quarter of the steps", "loss_first", 4, False)
    row("training MSE, mean of the last quarter of the steps", "loss_last", 4, False)
    row("relative change of the template weights after N steps", "weight_change", 4, False)
    agreement = ""
    if len(systems) == 2:
        diff = max(
            abs(a - b)
            for a, b in zip(table["ours"]["eval_before_all"], table["diffsynth"]["eval_before_all"])
        )
        agreement = (
            f" Eval MSE before training, ours vs DiffSynth (same weights, template and first sample; "
            f"max over sigmas {', '.join(map(str, EVAL_SIGMAS))}): difference {diff:.2e}."
        )
    runs = "; ".join(
        f"{LABELS[s]} " + ", ".join(f"{v:.3f}" for v in table[s]["stage2_runs"]) for s in systems
    )
    info = table.get("diffsynth", {}).get("info", {})
    settings = (
        f"{args.samples} procedural {args.size}x{args.size} images with prompts and a brightness value, "
        f"{TEXT_TOKENS} prompt tokens, {args.kv_length} KV tokens per block (one `scale` value_kv / "
        f"brightness-example template, identical initial weights), random-weight klein DiT of "
        f"{table[systems[0]]['dit']}; batch 1, float32, AdamW lr {LEARNING_RATE:g} weight decay "
        f"{WEIGHT_DECAY:g}, constant schedule, no gradient clipping, {args.steps} steps per stage-II run, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'} in both; median over {args.repeats} run(s) per "
        f"system, interleaved (ours, DiffSynth, ...)"
    )
    lines = [
        "## Training: ours vs DiffSynth-Studio (split training)",
        "",
        "Written by `benchmarks/compare_training.py`.",
        "",
        f"Machine: {machine_description(table[systems[0]]['threads'])}.",
        f"DiffSynth-Studio: diffsynth {info.get('diffsynth', 'n/a')} "
        f"({info.get('torchvision', 'torchvision n/a')}), its script {source}."
        if "diffsynth" in table
        else "DiffSynth-Studio: not run (--no-diffsynth).",
        f"Settings: {settings}.",
        "",
        "| measure | ours | DiffSynth-Studio | ours / DiffSynth |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Stage II s / step per run: {runs}.{agreement}",
        "",
        "What differs per step: DiffSynth draws the timestep uniformly from a 1000-entry shifted grid and "
        "multiplies the MSE by a bell-shaped timestep weight (the training MSE above is divided by it), "
        "ours draws sigma from the same shift continuously and takes the plain MSE. DiffSynth's "
        "`ConstantLR(optimizer)` (torch defaults: factor 1/3 for 5 steps) trains its first 5 steps at a "
        "third of the learning rate, hence its smaller weight change; the arithmetic per step is the "
        "same. DiffSynth's template "
        "forward and DiT run through its pipeline units and `model_fn` on each step, ours through "
        "`TrainingModule`. Stage I: both cache text embeddings (512 tokens) and VAE latents; DiffSynth "
        "also caches the template's `process_inputs` output, noise, ids and shape arguments per sample "
        "in one `.pth` file, ours writes content-keyed safetensors (text, latents) plus shards.",
    ]
    if args.note:
        lines += ["", f"Note: {args.note}"]
    return "\n".join(lines) + "\n"


def run_benchmark(args) -> str:
    systems = [s for s in SYSTEMS if not (s == "diffsynth" and args.no_diffsynth)]
    pythons = {"ours": sys.executable, "diffsynth": args.diffsynth_python}
    with contextlib.ExitStack() as stack:
        if args.workdir:
            tmp = Path(args.workdir).resolve()
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compare-training-")))
        script, source = (None, "")
        if "diffsynth" in systems:
            script, source = find_train_script(args, tmp)
        t0 = time.perf_counter()
        spec = build_setup(tmp, args)
        (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
        print(
            f"built the model, template and dataset in {time.perf_counter() - t0:.1f} s ({tmp})",
            file=sys.stderr,
        )
        results: dict[str, dict[str, list[dict]]] = {s: {"data_process": [], "train": []} for s in systems}
        for r in range(args.repeats):
            for stage in ("data_process", "train"):
                for s in systems:  # interleaved: ours, DiffSynth, ours, DiffSynth, ...
                    out = run_worker(s, stage, pythons[s], tmp, f"r{r}", script if s == "diffsynth" else None)
                    results[s][stage].append(out)
        return report(args, summarize(results, args.samples), source)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="stage-II optimizer steps per run (>= 3)")
    p.add_argument("--repeats", type=int, default=3, help="runs of both stages per system, interleaved")
    p.add_argument("--samples", type=int, default=16, help="dataset size (stage I processes all of it)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 16)")
    p.add_argument("--kv-length", type=int, default=512, help="KV tokens per block of the template")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads per worker process"
    )
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="train without gradient checkpointing (both systems)",
    )
    p.add_argument("--quick", action="store_true", help="smallest settings: 4 samples, 3 steps, 1 run")
    p.add_argument("--tiny", action="store_true", help="a tiny DiT (smoke tests; not for the table)")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument(
        "--diffsynth-python",
        default=os.environ.get("DIFFSYNTH_PYTHON", sys.executable),
        help="interpreter of the environment with DiffSynth-Studio (default: $DIFFSYNTH_PYTHON or this one)",
    )
    p.add_argument(
        "--diffsynth-repo",
        default=os.environ.get("DIFFSYNTH_STUDIO_REPO"),
        help=f"DiffSynth-Studio checkout or git directory holding {TRAIN_SCRIPT} "
        f"(default: $DIFFSYNTH_STUDIO_REPO, else one of {', '.join(DEFAULT_REPOS)})",
    )
    p.add_argument("--diffsynth-rev", default="HEAD", help="revision to read from a git directory")
    p.add_argument("--diffsynth-train-script", default=None, help="DiffSynth's FLUX.2 train.py itself")
    p.add_argument("--no-diffsynth", action="store_true", help="run ours only")
    p.add_argument("--workdir", default=None, help="keep models, caches and logs here (default: a temp dir)")
    p.add_argument("--note", default="", help="a sentence about the run written under the table")
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    for name in ("stage", "spec", "cache", "output", "result", "script"):
        p.add_argument(f"--worker-{name}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.quick:
        args.samples, args.steps, args.repeats = 4, 3, 1
    if args.steps < 3:
        p.error("--steps must be >= 3: the first step is not timed and the rest give the median")
    if args.samples < 2 or args.size % 16:
        p.error("--samples must be >= 2 and --size a multiple of 16")
    table = run_benchmark(args)
    print(table)
    if not args.no_write:
        write_section(args.out, "Training", table)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
