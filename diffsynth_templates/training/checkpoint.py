"""Checkpoints: the trained weights in their usable formats, plus everything needed to resume exactly.

``checkpoint-{step}/`` holds only what was trained:

* a template: the declarative template folder itself (``template.json`` with the base model and its
  ``base_backbone``, ``model.safetensors``, ``README.md``), so
  ``TemplatePipeline.from_pretrained("…/checkpoint-500")`` loads it directly;
* full DiT fine-tuning: ``transformer/`` in the official diffusers layout (``Flux2DiT`` /
  ``ZImageDiT.from_pretrained``);
* a DiT LoRA: ``dit_lora.safetensors`` in the LoRA-cache format (a pipeline's ``lora=`` argument);

and ``training_args.json`` plus ``training_state/``: ``state.json`` (step, data position, the LR
schedule is a pure function of the step), ``optimizer.safetensors`` + the optimizer's non-tensor
state in ``state.json``, raw LoRA parameters, and per-rank RNG states (torch, CUDA, numpy, python)
as safetensors + JSON. Nothing is pickled. The folder is assembled in a new temporary sibling and
renamed into place once complete (``loading.write_safety``: it carries the project's marker, and an
existing ``checkpoint-N`` is replaced or pruned only when it is ours); ``latest.json`` then points at it.
A checkpoint whose weights or optimizer state hold NaN/inf is never written.

``--resume`` validates a checkpoint before trusting it: every file readable, weights and optimizer
state finite, ``state.json`` well-formed. ``--resume PATH`` refuses a damaged one naming the file;
``--resume auto`` falls back to the newest good one, warning which were skipped and why, and refuses
(rather than silently restarting from step 0) when checkpoints exist but none is good.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DiffSynthTemplatesError
from ..loading import CheckpointError, save_safetensors_atomic, write_json_atomic
from ..loading.finite import NonFiniteError, check_finite_state
from ..loading.safetensors_io import load_safetensors
from ..loading.write_safety import (
    UnsafeOutputError,
    check_output_folder,
    commit_folder,
    new_staging_folder,
    remove_our_folder,
)
from ..templates.folder import TemplateSpec, save_template_folder
from .components import TemplateHandle
from .config import TrainConfig
from .distributed import (
    gather_optimizer_state,
    gather_tensors,
    is_deepspeed,
    is_fsdp,
    is_zero3,
    main_process_error,
    shard_optimizer_state,
    shard_state_dict,
)
from .dit_lora import export_dit_lora

logger = logging.getLogger(__name__)

STATE_DIR = "training_state"
LATEST = "latest.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STAGING = re.compile(r"^\.checkpoint-\d+\.tmp-[A-Za-z0-9_]+$")  # new_staging_folder's names for checkpoints
# arguments that must not change between a run and its resumption (the result would not be the same run)
RESUME_KEYS = (
    "trainable_models",
    "architecture",
    "architecture_config",
    "template",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "max_pixels",
    "max_sequence_length",
    "mixed_precision",
)


class ResumeError(DiffSynthTemplatesError, RuntimeError):
    """A checkpoint cannot be resumed from (missing, incomplete, or from a different configuration)."""


class DamagedCheckpointError(ResumeError):
    """A checkpoint file is unreadable, malformed or holds NaN/inf: ``--resume auto`` tries an older one."""


@dataclass
class TrainingState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # micro-batches of that epoch already consumed (per rank)
    num_processes: int = 1


class _Weights:
    """A state dict posing as a module for ``save_template_folder`` (weights may come gathered from ZeRO-3)."""

    def __init__(self, state_dict: dict[str, Tensor]):
        self._state_dict = state_dict

    def state_dict(self) -> dict[str, Tensor]:
        return self._state_dict


# --------------------------------------------------------------------------------------------------
# non-pickled optimizer and RNG state
# --------------------------------------------------------------------------------------------------


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for param_id, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"state/{param_id}/{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, param_id, key = name.split("/", 2)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, entries in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(entries)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": [name, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda/")), key=lambda k: int(k[5:]))
    ]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------


def _split(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def is_checkpoint(folder: Path) -> bool:
    """A ``checkpoint-N`` folder this project wrote: its marker, or the layout older versions wrote."""
    return bool(_CHECKPOINT.match(folder.name)) and (folder / STATE_DIR / "state.json").is_file()


def check_checkpoint_targets(output_path: Path, steps: list[int]) -> None:
    """Refuse, before training, ``checkpoint-N`` folders the run would have to replace that are not ours."""
    for step in steps:
        check_output_folder(
            output_path / f"checkpoint-{step}",
            overwrite=True,
            recognise=is_checkpoint,
            what="checkpoint folder",
        )


def check_run_folder(output_path: Path, total_steps: int, save_steps: int | None) -> None:
    """Before training: the checkpoints this run will write may replace only our own ``checkpoint-N``
    folders, and ``latest.json`` there must be ours (``--output_path`` may be any folder, even ``.``)."""
    planned = [
        step
        for step, _ in list_checkpoints(output_path)
        if 1 <= step <= total_steps and (step == total_steps or (save_steps and step % save_steps == 0))
    ]
    check_checkpoint_targets(output_path, planned)
    latest = output_path / LATEST
    if latest.exists() and not _is_latest(latest):
        raise UnsafeOutputError(
            f"{latest} exists and was not written by diffsynth_templates (the run would overwrite it); "
            "move it away or choose another --output_path"
        )


def _is_latest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and set(data) == {"checkpoint", "step"}


def remove_leftovers(output_path: Path) -> None:
    """Staging folders of checkpoints a killed run never finished (only our own temporary names)."""
    for path in output_path.glob(".checkpoint-*.tmp-*"):
        if _STAGING.match(path.name) and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _saved_tensors(full: dict[str, Tensor], config: TrainConfig, template) -> dict[str, Tensor]:
    """The parts of the training module's state that a checkpoint holds (frozen weights are not saved)."""
    prefixes = [f"{m}." for m in config.trainable_models if m != "template" or template is not None]
    return {k: v for k, v in full.items() if k.startswith(tuple(prefixes))}


def _check_finite_before_saving(
    final: Path, weights: dict[str, Tensor], optimizer_tensors: dict[str, Tensor] | None
) -> None:
    try:
        check_finite_state(weights, f"refusing to write {final}: the trained weights")
        if optimizer_tensors is not None:
            check_finite_state(optimizer_tensors, f"refusing to write {final}: the optimizer state")
    except NonFiniteError as e:
        raise NonFiniteError(
            f"{e}. Training diverged: lower --learning_rate (or raise --warmup_steps) and resume from the last "
            "good checkpoint"
        ) from None


def save_checkpoint(
    accelerator,
    model,
    optimizer,
    output_path: Path,
    state: TrainingState,
    config: TrainConfig,
    template: TemplateHandle | None,
    dit_config: dict[str, Any],
    save_optimizer: bool = True,
) -> Path:
    """Write ``checkpoint-{step}`` (every rank calls this; rank 0 writes the shared files).

    Every rank checks first (the target may be replaced, nothing is NaN/inf), so all raise alike
    before any of them waits for the others.
    """
    from accelerate.utils import broadcast_object_list

    final = output_path / f"checkpoint-{state.step}"
    check_checkpoint_targets(output_path, [state.step])
    full, optimizer_state = _trained_state(
        accelerator, model, optimizer, save_optimizer, config, template, final
    )
    main = accelerator.is_main_process
    staging = [None]
    if main:
        staging[0] = str(new_staging_folder(final))
        if "template" in config.trainable_models and template is not None:
            save_template_folder(staging[0], _Weights(_split(full, "template.")), copy_spec(template))
    staging = Path(broadcast_object_list(staging)[0])  # every rank writes its RNG state into the same folder
    try:
        tensors, meta = rng_state()  # each rank's own generators
        rank = accelerator.process_index
        save_safetensors_atomic(tensors, staging / STATE_DIR / f"rng-rank{rank}.safetensors")
        write_json_atomic(meta, staging / STATE_DIR / f"rng-rank{rank}.json")

        if main:
            if "dit" in config.trainable_models:
                save_safetensors_atomic(
                    _split(full, "dit."), staging / "transformer" / "diffusion_pytorch_model.safetensors"
                )
                write_json_atomic(dit_config, staging / "transformer" / "config.json")
            if "dit_lora" in config.trainable_models:
                raw = _split(full, "dit_lora.")
                unwrapped = accelerator.unwrap_model(model)
                save_safetensors_atomic(raw, staging / STATE_DIR / "dit_lora_raw.safetensors")
                lora = {k: v.detach() for k, v in _lora_cache(unwrapped.dit_lora, raw).items()}
                save_safetensors_atomic(
                    lora, staging / "dit_lora.safetensors", metadata={"format": "lora-cache"}
                )
                export_dit_lora(lora, dit_config, config.lora_export_format, staging)
            extra: dict[str, Any] = {}
            if optimizer_state is not None:
                opt_tensors, extra = flatten_optimizer_state(optimizer_state)
                save_safetensors_atomic(opt_tensors, staging / STATE_DIR / "optimizer.safetensors")
            write_json_atomic(
                {**asdict(state), "optimizer": extra or None}, staging / STATE_DIR / "state.json"
            )
            write_json_atomic(config.to_json(), staging / "training_args.json")
        accelerator.wait_for_everyone()

        if main:
            commit_folder(staging, final, kind="checkpoint")
            write_json_atomic({"checkpoint": final.name, "step": state.step}, output_path / LATEST)
            _prune(output_path, config.save_total_limit)
            logger.info("saved %s", final)
    finally:
        if main and staging.exists():  # a failed save leaves no half folder behind
            shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _trained_state(accelerator, model, optimizer, save_optimizer: bool, config, template, final: Path):
    """The module's state dict and the optimizer's, whole and checked finite on every rank.

    Under FSDP2 only the trained tensors are gathered, one at a time, and only rank 0 keeps them (the
    other ranks get empty dicts after checking every tensor too).
    """
    if not is_fsdp(accelerator):
        full = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; a plain state_dict otherwise
        optimizer_state = optimizer.state_dict() if save_optimizer and not is_deepspeed(accelerator) else None
        if save_optimizer and is_deepspeed(accelerator):  # gathered whole, in one process's layout
            from .zero_state import gather_zero_optimizer_state, trainable

            params = trainable(accelerator.unwrap_model(model))
            keep = accelerator.is_main_process
            check = lambda k, v: _check_finite_before_saving(final, {}, {k: v})  # noqa: E731  every rank
            optimizer_state = gather_zero_optimizer_state(optimizer, params, keep, check) or None
        flat = None if optimizer_state is None else flatten_optimizer_state(optimizer_state)[0]
        error = None
        try:
            if full is not None:
                _check_finite_before_saving(final, _saved_tensors(full, config, template), flat)
        except NonFiniteError as e:
            error = e
        if is_zero3(accelerator):  # the weights were gathered on rank 0 only: its verdict is every rank's
            error = main_process_error(accelerator, error)
        if error is not None:
            raise error
        return full or {}, optimizer_state
    main = accelerator.is_main_process
    trained = _saved_tensors(accelerator.unwrap_model(model).state_dict(), config, template)
    full = gather_tensors(
        trained.items(), main, lambda k, v: _check_finite_before_saving(final, {k: v}, None)
    )
    optimizer_state = None
    if save_optimizer:
        check = lambda k, v: _check_finite_before_saving(final, {}, {k: v})  # noqa: E731
        optimizer_state = gather_optimizer_state(optimizer.state_dict(), main, check) or None
    return full, optimizer_state


def copy_spec(template: TemplateHandle) -> TemplateSpec:
    return copy.deepcopy(template.spec)  # save_template_folder edits the spec it is given


def _lora_cache(dit_lora, raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA-cache dict (alpha / rank folded into B) from raw ``lora_A.x`` / ``lora_B.x`` parameters."""
    out = {}
    for name in dit_lora.module_names:
        key = name.replace(".", "__")
        out[f"{name}.lora_A.weight"] = raw[f"lora_A.{key}"]
        out[f"{name}.lora_B.weight"] = raw[f"lora_B.{key}"] * dit_lora.scale
    return out


def list_checkpoints(output_path: Path) -> list[tuple[int, Path]]:
    found = []
    for path in output_path.glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _prune(output_path: Path, limit: int | None) -> None:
    """Keep the newest ``limit`` of our checkpoints; a user's folder named ``checkpoint-N`` is never touched."""
    if not limit:
        return
    ours = [path for _, path in list_checkpoints(output_path) if is_checkpoint(path)]
    for path in ours[:-limit]:
        if remove_our_folder(path, recognise=is_checkpoint):
            logger.info("removed old checkpoint %s (--save_total_limit %d)", path, limit)


# --------------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------------


def find_resume_checkpoint(config: TrainConfig) -> Path | None:
    """``--resume auto``: the newest checkpoint under ``--output_path`` (None: start fresh), unvalidated."""
    candidates = _resume_candidates(config)
    return candidates[-1] if candidates else None


def _resume_candidates(config: TrainConfig) -> list[Path]:
    """``--resume PATH``: that folder; ``auto``: every checkpoint under ``--output_path``, oldest first."""
    if config.resume is None:
        return []
    if config.resume != "auto":
        path = Path(config.resume)
        if not (path / STATE_DIR / "state.json").is_file():
            raise ResumeError(f"--resume {path} is not a checkpoint folder with a {STATE_DIR}/state.json")
        return [path]
    return [p for _, p in list_checkpoints(Path(config.output_path)) if is_checkpoint(p)]


def resume_training(config: TrainConfig, accelerator, model, optimizer) -> TrainingState | None:
    """Restore the run ``--resume`` names; None when there is nothing to resume (a fresh start).

    With ``auto`` a damaged checkpoint is skipped with a warning and the one before it is tried; when
    checkpoints exist but none is good this refuses: restarting from step 0 would silently discard the
    run, so the user decides (a new ``--output_path``, or ``--resume PATH``).
    """
    candidates = _resume_candidates(config)
    if not candidates:
        if config.resume == "auto":
            logger.info(
                "--resume auto: no checkpoint under %s yet, starting from scratch", config.output_path
            )
        return None
    if config.resume != "auto":
        return load_checkpoint(candidates[0], accelerator, model, optimizer, config)
    skipped: list[str] = []
    for folder in reversed(candidates):
        try:
            state = load_checkpoint(folder, accelerator, model, optimizer, config)
        except DamagedCheckpointError as e:
            logger.warning("--resume auto: skipping %s, it cannot be resumed from: %s", folder, e)
            skipped.append(f"{folder.name} ({e})")
            continue
        if skipped:
            logger.warning(
                "--resume auto: resumed from %s, the newest good checkpoint; skipped %d damaged one(s): %s",
                folder, len(skipped), "; ".join(skipped),
            )  # fmt: skip
        return state
    raise ResumeError(
        f"--resume auto: none of the {len(candidates)} checkpoint(s) under {config.output_path} can be resumed "
        f"from: {'; '.join(skipped)}. Nothing was changed. Start a new run with another --output_path, or "
        "move the damaged checkpoints away to start this one from scratch"
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpointError(f"{str(path)!r} is missing; the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedCheckpointError(f"{str(path)!r} is not readable JSON ({e})") from e


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A checkpoint's safetensors file, readable and finite, else ``DamagedCheckpointError`` naming it."""
    try:
        tensors = load_safetensors(path)
        check_finite_state(tensors, repr(str(path)))
    except (CheckpointError, NonFiniteError) as e:
        raise DamagedCheckpointError(str(e)) from e
    return tensors


def _check_state_json(saved: Any, path: Path) -> None:
    """``state.json``: the counters are non-negative integers, the optimizer's state a mapping (or null)."""
    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "num_processes": 1}
    if not isinstance(saved, dict):
        raise DamagedCheckpointError(f"{str(path)!r} must hold a JSON object, got {type(saved).__name__}")
    for key, least in counters.items():
        value = saved.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DamagedCheckpointError(
                f"{str(path)!r}: {key!r} must be an integer >= {least}, got {value!r}; the file is damaged"
            )
    optimizer = saved.get("optimizer")
    if optimizer is not None and not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(isinstance(g, dict) for g in optimizer["param_groups"])
        and isinstance(optimizer.get("scalars"), dict)
    ):
        raise DamagedCheckpointError(
            f"{str(path)!r}: 'optimizer' must be null or an object with 'param_groups' and 'scalars'; "
            "the file is damaged"
        )


def check_resume_config(folder: Path, config: TrainConfig) -> None:
    saved = _read_json(folder / "training_args.json")
    if not isinstance(saved, dict):
        raise DamagedCheckpointError(f"{str(folder / 'training_args.json')!r} must hold a JSON object")
    changed = [
        f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}"
        for k in RESUME_KEYS
        if saved.get(k) != getattr(config, k)
    ]
    if changed:
        raise ResumeError(
            f"cannot resume {folder}: these arguments differ from the run that wrote it: {'; '.join(changed)}. "
            "Use the original values, or start a new run with a different --output_path."
        )


def _load_into(module, tensors: dict[str, Tensor], path: Path) -> None:
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # missing / unexpected / mis-shaped keys
        raise DamagedCheckpointError(f"{str(path)!r} does not fit the model being trained: {e}") from e


def _load_module_and_optimizer(
    accelerator, optimizer, unwrapped, loaded, optimizer_state, optimizer_path
) -> None:
    sharded = is_fsdp(accelerator)  # whole tensors are cut into this rank's shards
    with torch.no_grad():
        for name, (tensors, path) in loaded.items():
            module = getattr(unwrapped, name)
            _load_into(module, shard_state_dict(module, tensors) if sharded else tensors, path)
    try:
        optimizer.load_state_dict(
            shard_optimizer_state(optimizer, optimizer_state) if sharded else optimizer_state
        )
    except (ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpointError(f"{str(optimizer_path)!r} does not fit the optimizer: {e}") from e


def _load_zero(accelerator, optimizer, unwrapped, loaded, optimizer_state, optimizer_path) -> None:
    """ZeRO: the names checked like ``load_state_dict`` would, then written into this rank's partitions."""
    from .zero_state import load_zero_state, trainable

    weights = {}
    for name, (tensors, path) in loaded.items():
        expected = set(getattr(unwrapped, name).state_dict())
        if set(tensors) != expected:
            missing, unexpected = sorted(expected - set(tensors))[:5], sorted(set(tensors) - expected)[:5]
            raise DamagedCheckpointError(
                f"{str(path)!r} does not fit the model being trained: missing {missing}, unexpected {unexpected}"
            )
        weights.update({f"{name}.{k}": v for k, v in tensors.items()})
    count = len(trainable(unwrapped))
    if sorted(optimizer_state["state"]) != list(range(count)):
        raise DamagedCheckpointError(
            f"{str(optimizer_path)!r} holds state for {len(optimizer_state['state'])} parameters; "
            f"{count} are trained"
        )
    load_zero_state(optimizer, unwrapped, weights, optimizer_state)


def load_checkpoint(folder: Path, accelerator, model, optimizer, config: TrainConfig) -> TrainingState:
    """Restore weights, optimizer, data position and this rank's RNG from ``folder``.

    Everything is read and checked before anything is restored, so a damaged checkpoint raises
    ``DamagedCheckpointError`` naming its file and leaves the model as it was. Every rank checks every
    rank's RNG files, so all ranks reach the same verdict.
    """
    check_resume_config(folder, config)
    state_path = folder / STATE_DIR / "state.json"
    saved = _read_json(state_path)
    _check_state_json(saved, state_path)
    if saved.get("optimizer") is None:
        raise ResumeError(
            f"{folder} has no optimizer state (written under DeepSpeed?); it cannot be resumed exactly"
        )
    weights: list[tuple[str, Path]] = []
    if "template" in config.trainable_models:
        weights.append(("template", folder / "model.safetensors"))
    if "dit" in config.trainable_models:
        weights.append(("dit", folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    if "dit_lora" in config.trainable_models:
        weights.append(("dit_lora", folder / STATE_DIR / "dit_lora_raw.safetensors"))
    loaded = {name: (_read_tensors(path), path) for name, path in weights}
    optimizer_path = folder / STATE_DIR / "optimizer.safetensors"
    optimizer_tensors = _read_tensors(optimizer_path)
    try:
        optimizer_state = unflatten_optimizer_state(optimizer_tensors, saved["optimizer"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise DamagedCheckpointError(
            f"{str(optimizer_path)!r} and {str(state_path)!r} do not agree: {e!r}"
        ) from e
    rng: dict[int, tuple[dict[str, Tensor], Any]] = {}
    for json_path in sorted((folder / STATE_DIR).glob("rng-rank*.json")):
        index = json_path.stem.removeprefix("rng-rank")
        if index.isdigit():
            rng[int(index)] = (_read_tensors(json_path.with_suffix(".safetensors")), _read_json(json_path))

    unwrapped = accelerator.unwrap_model(model)
    if is_deepspeed(accelerator):
        _load_zero(accelerator, optimizer, unwrapped, loaded, optimizer_state, optimizer_path)
    else:
        _load_module_and_optimizer(accelerator, optimizer, unwrapped, loaded, optimizer_state, optimizer_path)
    state = TrainingState(**{k: saved[k] for k in ("step", "epoch", "batch_in_epoch", "num_processes")})
    if state.num_processes != accelerator.num_processes:
        logger.warning(
            "resuming a %d-process run with %d processes: data order and RNG streams differ from an uninterrupted run",
            state.num_processes,
            accelerator.num_processes,
        )
    mine = rng.get(accelerator.process_index)
    if mine is not None:
        try:
            set_rng_state(*mine)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise DamagedCheckpointError(
                f"{str(folder / STATE_DIR)!r}: the RNG state of rank {accelerator.process_index} is damaged ({e!r})"
            ) from e
    logger.info(
        "resumed from %s at step %d (epoch %d, batch %d)",
        folder,
        state.step,
        state.epoch,
        state.batch_in_epoch,
    )
    return state
