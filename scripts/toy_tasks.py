"""The toy world's templates: what each one is, what it reads from a toy row, and how it is trained.

    python scripts/toy_tasks.py list
    python scripts/toy_tasks.py dataset --task color --data datasets/toy   # the folder the task trains on
    python scripts/toy_tasks.py prepare --task brightness --data datasets/toy --base models/toy/base \
        --work outputs/toy_work          # writes the task's metadata and architecture config, prints paths

``scripts/train_toy.sh`` calls ``prepare`` for each task and then ``train.py`` with the printed files,
so the templates in ``models/toy/templates/`` are trained by the same two-stage trainer users run.
Each task's metadata is the toy dataset's rows with ``template_inputs`` rewritten to exactly the
inputs its template takes (the toy generator records every annotation; a task picks its own). A task
may train on its own copy of the dataset, generated with the same seed (the same scenes and captions)
but a wider tint range, so that its requests at inference stay inside what it was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

Row = dict[str, Any]
UNALIGNED_SEED = 25  # the stream of the unaligned prompts' draws (issue 25)


def _brightness(row: Row) -> dict[str, Any]:
    return {"scale": row["brightness"]}


def _color(row: Row) -> dict[str, Any]:
    return dict(zip("RGB", row["mean_rgb"]))


def _structure(row: Row) -> dict[str, Any]:
    return {"image": row["mask"]}  # the shapes' silhouettes: white where a shape is


def _inpaint(row: Row) -> dict[str, Any]:
    return {"image": row["image"]}  # the mask is drawn per sample by the inpaint data processor


def _super_resolution(row: Row) -> dict[str, Any]:
    return {"image": row["lowres"]}  # 4x area-downscaled; the template encodes it at 4x its size


def _sharpness(row: Row) -> dict[str, Any]:
    return {"lora_ids": [int(row["sharpness_level"] > 0)], "lora_scales": [1.0]}  # 0 sharp, 1 blurred


def _unaligned_prompt(row: Row, index: int) -> dict[str, Any]:
    """A prompt that does not describe the row's layout (``train.py --unaligned_prompt``): half the rows
    without positions, half with every shape placed elsewhere, drawn from the row's index."""
    from diffsynth_templates.toy import world

    spec, rng = world.SceneSpec.from_dict(row["spec"]), np.random.default_rng([UNALIGNED_SEED, index])
    if rng.random() < 0.5:
        return {"prompt_unaligned": world.caption_without_layout(spec)}
    return {"prompt_unaligned": world.misplaced_caption(spec, rng)}


@dataclass
class FineTune:
    """A second phase: the task's template, published (bf16) after its first phase, trained further
    from that folder (``train.py --template``) with its own metadata columns and flags."""

    steps: int
    learning_rate: float
    columns: Callable[[Row, int], dict[str, Any]] | None = None  # metadata columns from (row, row index)
    train_flags: tuple[str, ...] = ()  # further train.py flags (both stages), e.g. condition dropout


@dataclass
class ToyTask:
    """One toy template: its zoo architecture, config overrides, inputs and training schedule."""

    name: str
    architecture: str
    inputs: Callable[[Row], dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # overrides of ``<Config>.for_dit(toy DiT)``
    data_processor: str | None = None
    data_processor_config: dict[str, Any] = field(default_factory=dict)
    steps: int = 600
    learning_rate: float = 1e-3
    # "original": the template reads its input images at their own size (train.py --condition_size)
    condition_size: str = "target"
    # Largest tint strength of the task's own copy of the dataset (same seed, so the same scenes and
    # captions); None trains on the base model's dataset.
    max_tint: float | None = None
    description: str = ""
    finetune: FineTune | None = None

    def card_description(self) -> str:
        """The published template's one-line description; says so when it trained on wider tints."""
        text = f"Toy world {self.name} template: {self.description}"
        if self.max_tint is not None:
            text += f"; trained on tints of strength up to {self.max_tint:g}"
        if self.finetune is not None:
            text += "; fine-tuned with condition dropout so that its input wins over the prompt"
        return text


TASKS: dict[str, ToyTask] = {
    t.name: t
    for t in (
        ToyTask(
            "brightness",
            "value_kv",
            _brightness,
            {"length": 16},
            steps=2000,
            description="mean luminance (Rec.601, [0, 1]) -> KV tokens",
        ),
        ToyTask(
            "color",
            "value_kv",
            _color,
            {"values": ["R", "G", "B"], "length": 16},
            steps=4000,
            max_tint=0.5,  # the base data's tints stop at 0.25; requests beyond it were extrapolations
            description="mean R, G, B ([0, 1] each) -> KV tokens",
        ),
        ToyTask(
            "structure",
            "image_kv",
            _structure,
            {"num_single_blocks": 2, "key_norm": True},
            steps=4000,
            # then the map must win over the prompt (issue 25): 30% of the samples without a prompt, 50% with
            # one that does not describe the layout (no positions, or wrong ones), 20% with their own
            finetune=FineTune(
                steps=1200,
                learning_rate=5e-4,
                columns=_unaligned_prompt,
                train_flags=("--caption_dropout", "0.3", "--unaligned_prompt", "0.5"),
            ),
            description="silhouette map of the shapes -> KV tokens (structure control)",
        ),
        ToyTask(
            "inpaint",
            "inpaint",
            _inpaint,
            {"num_single_blocks": 1, "key_norm": True},
            data_processor="inpaint",
            data_processor_config={"coverage": [0.1, 0.4], "kind": "box"},
            description="image + mask -> KV tokens; force_inpaint keeps the unmasked pixels",
        ),
        ToyTask(
            "super_resolution",
            "image_kv",
            _super_resolution,
            {"num_single_blocks": 2, "upscale": 4.0, "key_norm": True},
            condition_size="original",  # the 16 px input, encoded at 4x: the 64 px target's 8 x 8 tokens
            steps=4000,
            description="4x downscaled low-resolution image -> KV tokens for the full-size image",
        ),
        ToyTask(
            "sharpness",
            "lora_bank",
            _sharpness,
            {"num_loras": 2, "rank": 4},
            steps=2000,
            description="LoRA 0 = sharp, LoRA 1 = blurred (a LoRA-carried template)",
        ),
    )
}


def architecture_config(task: ToyTask, base: Path) -> dict[str, Any]:
    """The task's zoo config built for the base model's DiT (blocks, heads, widths read from it)."""
    from diffsynth_templates.backbones.flux2_dit import Flux2DiTConfig
    from diffsynth_templates.templates.registry import get_architecture

    dit_config = Flux2DiTConfig.from_diffusers(json.loads((base / "transformer" / "config.json").read_text()))
    config_class = get_architecture(task.architecture).config_class
    return json.loads(json.dumps(asdict(config_class.for_dit(dit_config, **task.config))))


def write_metadata(
    task: ToyTask, data: Path, out: Path, columns: Callable[[Row, int], dict[str, Any]] | None = None
) -> Path:
    """The toy rows with ``template_inputs`` replaced by the task's inputs (paths stay relative to data),
    plus ``columns(row, index)`` when given."""
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    lines = [
        json.dumps(
            {
                "image": r["image"],
                "prompt": r["prompt"],
                "template_inputs": task.inputs(r),
                **(columns(r, i) if columns else {}),
            }
        )
        for i, r in enumerate(rows)
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out


def prepare(task: ToyTask, data: Path, base: Path, work: Path) -> dict[str, str]:
    folder = work / task.name
    metadata = write_metadata(task, data, folder / "metadata.jsonl")
    if task.finetune is not None:
        write_metadata(task, data, folder / "finetune.jsonl", task.finetune.columns)
    config_path = folder / "architecture_config.json"
    config_path.write_text(json.dumps(architecture_config(task, base), indent=1))
    paths = {"metadata": str(metadata), "architecture_config": str(config_path)}
    if task.data_processor:
        processor = folder / "data_processor_config.json"
        processor.write_text(json.dumps(task.data_processor_config))
        paths["data_processor_config"] = str(processor)
    return paths


def task_dataset(task: ToyTask, data: Path, num_samples: int, seed: int, size: int) -> Path:
    """The dataset the task trains on: ``data`` itself, or a sibling copy with a wider tint range.

    The copy is generated once, with the same seed, so its scenes and captions are ``data``'s; only
    the tinted images differ.
    """
    if task.max_tint is None:
        return data
    from diffsynth_templates.toy import world

    folder = data.with_name(f"{data.name}-tint{task.max_tint:g}")
    if not (folder / "metadata.jsonl").is_file():
        world.generate(folder, num_samples, seed, size, max_tint=task.max_tint, overwrite=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="print the task names, one per line")
    sub.add_parser("describe", help="print a task's one-line description").add_argument(
        "--task", required=True, choices=sorted(TASKS)
    )
    ds = sub.add_parser("dataset", help="print the dataset folder a task trains on (generated if missing)")
    ds.add_argument("--task", required=True, choices=sorted(TASKS))
    ds.add_argument("--data", default="datasets/toy", help="the base model's dataset")
    ds.add_argument("--num_samples", type=int, default=4000)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--size", type=int, default=64)
    prep = sub.add_parser("prepare", help="write a task's metadata + configs; print train.py flags")
    prep.add_argument("--task", required=True, choices=sorted(TASKS))
    prep.add_argument("--data", default="datasets/toy")
    prep.add_argument("--base", default="models/toy/base")
    prep.add_argument("--work", default="outputs/toy_work")
    prep.add_argument(
        "--phase",
        choices=("train", "finetune"),
        default="train",
        help="finetune: the flags of the task's second phase (train.py --template gives its start)",
    )
    sub.add_parser("has_finetune", help="exit 0 when the task has a fine-tuning phase").add_argument(
        "--task", required=True, choices=sorted(TASKS)
    )
    args = p.parse_args(argv)
    if args.command == "list":
        print("\n".join(TASKS))
        return
    if args.command == "describe":
        print(TASKS[args.task].card_description())
        return
    task = TASKS[args.task]
    if args.command == "has_finetune":
        sys.exit(0 if task.finetune is not None else 1)
    if args.command == "dataset":
        print(task_dataset(task, Path(args.data), args.num_samples, args.seed, args.size))
        return
    paths = prepare(task, Path(args.data), Path(args.base), Path(args.work))
    if args.phase == "finetune":
        if task.finetune is None:
            sys.exit(f"error: the {task.name} task has no fine-tuning phase")
        print(" ".join([
            f"--dataset_metadata_path {Path(paths['metadata']).with_name('finetune.jsonl')}",
            f"--template_name toy-{task.name}",
            f"--learning_rate {task.finetune.learning_rate}",
            f"--max_steps {task.finetune.steps}",
            f"--condition_size {task.condition_size}",
            *task.finetune.train_flags,
        ]))  # fmt: skip
        return
    flags = [
        f"--dataset_metadata_path {paths['metadata']}",
        f"--architecture {task.architecture}",
        f"--architecture_config {paths['architecture_config']}",
        f"--template_name toy-{task.name}",
        f"--learning_rate {task.learning_rate}",
        f"--max_steps {task.steps}",
        f"--condition_size {task.condition_size}",
    ]
    if task.data_processor:
        flags += [
            f"--data_processor {task.data_processor}",
            f"--data_processor_config {paths['data_processor_config']}",
        ]
    print(" ".join(flags))


if __name__ == "__main__":
    main()
