"""The two-stage trainer: stage I writes features (``process_dataset``), stage II optimizes (``train``).

``run(config)`` dispatches on ``config.task``:

* ``data_process`` - every rank extracts features for its share of the samples not yet in the cache
  and commits them in shards; rank 0 merges the index at the end (see ``feature_cache``);
* ``train`` - loads only the DiT (+ template), checks the cache's fingerprint, trains from it;
* ``full`` - the same training loop, with the features computed on the fly by the stage-I code, never
  written to disk.

The base model's backbone (FLUX.2-klein or Z-Image) is read from its folder (``backbones``); it picks
the loaders, the text encoding and the objective, and is part of the cache fingerprint.

Multi-process runs go through ``accelerate``: DDP, FSDP2 (``distributed``: sharded weights, gradients and
optimizer state, checkpoints gathered to rank 0) or DeepSpeed when the accelerate config selects it (then
accelerate imports ``deepspeed``, nothing here does). With ``W`` processes and ``A`` accumulation steps,
rank ``r``'s micro-batch ``m`` draws its noise as micro-batch ``m * W + r`` of a one-process run with
``W * A`` accumulation steps, which sees the same samples in the same order: every mode trains the same
model as one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..loading import CheckpointError
from ..loading.finite import NonFiniteError
from ..pipelines.flow_match import TRAINING_MU
from .backbones import TrainingBackbone, UnsupportedFeatureError
from .checkpoint import (
    ResumeError,
    TrainingState,
    check_run_folder,
    remove_leftovers,
    resume_training,
    save_checkpoint,
)
from .components import (
    TemplateHandle,
    TemplateSetupError,
    base_model_fingerprint,
    build_template,
    import_user_modules,
    load_dit,
    load_pipeline,
    model_dtype,
    resolve_base,
    training_backbone,
)
from .config import ConfigError, TrainConfig
from .dataset import BucketBatchSampler, DatasetConfig, DatasetError, TemplateDataset, read_metadata
from .distributed import (
    check_fsdp,
    enable_cpu_fsdp,
    is_deepspeed,
    is_fsdp,
    local_norm,
    log_shares,
    prepare_distributed,
    process_group_backend,
    unsharded_root,
)
from .dit_lora import DiTLoRA
from .feature_cache import (
    ContentStore,
    FeatureCacheError,
    ShardWriter,
    check_fingerprint,
    clear_leftovers,
    merge_index,
    open_cache,
    read_index,
    scan_shards,
    store_reference,
    write_initial_index,
)
from .features import FeatureError, FeatureExtractor, SafeItems, SampleFeatures, SampleSkipped
from .metrics import MetricsLog
from .objective import TrainingModule, noise_seed
from .validation import check_validation_images, render_validation, save_grid

logger = logging.getLogger(__name__)

# parts of the cache fingerprint a stage-II run checks: always, with a template, with a dataset given
_ALWAYS = ("backbone", "base_model", "features")
_TEMPLATE = ("template", "data_processor")
# test hook: a training process exits abruptly (as if killed) after this many optimizer steps
FAULT_STEPS_ENV = "DIFFSYNTH_TEMPLATES_FAULT_AFTER_STEPS"


# errors about the run's inputs (arguments, files, caches, checkpoints); train.py prints them without a traceback
USER_ERRORS = (
    ConfigError,
    DatasetError,
    FeatureCacheError,
    FeatureError,
    ResumeError,
    TemplateSetupError,
    CheckpointError,
    FileNotFoundError,
    UnsupportedFeatureError,
)


@dataclass
class DataProcessResult:
    cache_path: Path
    num_samples: int
    num_skipped: int
    complete: bool


@dataclass
class TrainResult:
    output_path: Path
    step: int
    checkpoint: Path | None
    losses: list[float] = field(default_factory=list)  # per optimizer step of this run, mean over ranks


# called with (model, optimizer) once both are built, before accelerate wraps them: benchmarks and tools
# observe the model there (parameters, a probe evaluation) without patching the trainer
ModelBuiltHook = Callable[[nn.Module, torch.optim.Optimizer], None]


def run(config: TrainConfig, on_model_built: ModelBuiltHook | None = None) -> DataProcessResult | TrainResult:
    import_user_modules(config)
    return process_dataset(config) if config.task == "data_process" else train(config, on_model_built)


# --------------------------------------------------------------------------------------------------
# shared setup
# --------------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # accelerate keeps its settings in process-wide singletons; drop those of an earlier run in this
    # process (the process group itself, PartialState, is kept) so run() can be called again
    AcceleratorState._reset_state()
    GradientState._reset_state()

    # stage-I ranks may finish far apart; the default 30-minute collective timeout is too short
    handlers: list[Any] = [
        InitProcessGroupKwargs(timeout=timedelta(hours=4), backend=process_group_backend())
    ]
    if config.find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )
    enable_cpu_fsdp(accelerator)  # CPU runs launched with an FSDP config: accelerate's FSDP2 path, on gloo
    if is_fsdp(accelerator):
        check_fsdp(accelerator)
    return accelerator


def _dataset(config: TrainConfig):
    report = read_metadata(config.dataset_metadata_path, config.dataset_base_path, on_bad_row="skip")
    dataset = TemplateDataset.from_report(
        report,
        DatasetConfig(
            max_pixels=config.max_pixels,
            seed=config.seed,
            condition_size=config.condition_size,
            **config.condition_dropout(),
        ),
    )
    return report, dataset


def dataset_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The metadata file's bytes and the image preparation: what decides which latents a sample gets."""
    metadata = Path(config.dataset_metadata_path).read_bytes()
    fingerprint = {
        "metadata": hashlib.sha256(metadata).hexdigest(),
        "max_pixels": config.max_pixels,
        "buckets": True,
    }
    if config.condition_size != "target":  # only when set, so caches written before the option stay valid
        fingerprint["condition_size"] = config.condition_size
    fingerprint.update(config.condition_dropout())  # likewise: only the settings that are on
    return fingerprint


def feature_fingerprint(
    config: TrainConfig,
    base: dict[str, str],
    template: TemplateHandle | None,
    dataset: dict[str, Any] | None,
    backbone: str = "flux2",
) -> dict[str, Any]:
    return {
        "backbone": backbone,  # FLUX.2 and Z-Image features never mix, whatever the weights
        "base_model": base,
        "template": None
        if template is None
        else {k: template.fingerprint[k] for k in ("architecture", "config")},
        "data_processor": None if template is None else template.fingerprint["data_processor"],
        "dataset": dataset,
        "features": {"max_sequence_length": config.max_sequence_length, "dtype": str(model_dtype(config))},
    }


def _cached_fingerprint(index: dict[str, Any]) -> dict[str, Any]:
    """The cache's fingerprint; caches written before Z-Image existed hold FLUX.2 features."""
    return {"backbone": "flux2", **index["fingerprint"]}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _as_list(items: list) -> list:
    return items


# --------------------------------------------------------------------------------------------------
# stage I
# --------------------------------------------------------------------------------------------------


def process_dataset(config: TrainConfig) -> DataProcessResult:
    """Stage I: features of every sample into ``config.cache_path``; a rerun finishes what is missing."""
    accelerator = make_accelerator(config)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device, dtype = accelerator.device, model_dtype(config)
    root = Path(config.cache_path)
    store_root = Path(config.shared_feature_cache) if config.shared_feature_cache else root / "store"

    folders = resolve_base(config)  # once for the run: a hub id downloads here, nowhere else
    backbone = training_backbone(config, folders)
    report, dataset = _dataset(config)
    backbone.check_samples(report.samples)
    template = build_template(config, config.seed, backbone.name) if config.uses_template else None
    base = base_model_fingerprint(config, folders)
    fingerprint = feature_fingerprint(config, base, template, dataset_fingerprint(config), backbone.name)
    fingerprint["processing_seed"] = config.seed

    existing = read_index(root)  # every rank checks, so a mismatch stops all of them alike
    if existing is not None:
        existing = {**existing, "fingerprint": _cached_fingerprint(existing)}
        check_fingerprint(existing, fingerprint, [*fingerprint], root,
                          "Use a new --cache_path for these inputs, or delete the old cache to rebuild it.")  # fmt: skip
        if existing["store"] != store_reference(root, store_root):
            raise FeatureCacheError(
                f"{root} keeps its text embeddings and latents in {existing['store']}; rerun with that "
                "--shared_feature_cache (or none, for the store inside the cache)"
            )
    if main:
        if existing is None:
            write_initial_index(root, fingerprint, store_root)
        clear_leftovers(root)  # a killed run's half-written shards, the last run's skipped lists
    accelerator.wait_for_everyone()

    done = {entry["id"] for entries in scan_shards(root).values() for entry in entries}
    pending = [i for i, sample in enumerate(report.samples) if sample.id not in done]
    mine = pending[rank::world]
    logger.info(
        "stage I: %d samples, %d already cached, %d to process (%d on this rank of %d)",
        len(report.samples), len(done), len(pending), len(mine), world,
    )  # fmt: skip

    if mine:
        pipe = load_pipeline(config, device, dtype, backbone=backbone, folders=folders)
        model = None
        if template is not None:
            model = template.model.to(device).eval()
        extractor = FeatureExtractor(
            pipe, base, config.max_sequence_length, config.max_pixels, model,
            template.processor if template else None, ContentStore(store_root),
        )  # fmt: skip
        writer = ShardWriter(root, rank, config.cache_chunk_size)
        loader = torch.utils.data.DataLoader(
            SafeItems(dataset, mine),
            batch_size=None,
            num_workers=config.dataset_num_workers,
            collate_fn=_as_list,
        )
        for item in tqdm(loader, total=len(mine), desc="stage I", disable=not main):
            try:
                writer.add(extractor(item))
            except SampleSkipped as e:
                writer.skip(item["id"], item["line"], str(e))
        writer.close()
    accelerator.wait_for_everyone()

    result = DataProcessResult(root, 0, 0, False)
    if main:
        index = merge_index(root, fingerprint, store_root, (s.id for s in report.samples))
        result = DataProcessResult(root, index["num_samples"], len(index["skipped"]), index["complete"])
        logger.info(
            "stage I done: %d samples cached, %d skipped -> %s", result.num_samples, result.num_skipped, root
        )
        for record in index["skipped"]:
            logger.warning("  skipped line %d: %s", record["line"], record["reason"])
    accelerator.wait_for_everyone()
    return result


# --------------------------------------------------------------------------------------------------
# stage II
# --------------------------------------------------------------------------------------------------


def learning_rate_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Linear warmup to the peak, then constant, cosine or linear decay to 0 at ``total_steps``."""
    peak = config.learning_rate
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_scheduler == "constant":
        return peak
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    if config.lr_scheduler == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)


def micro_batches(
    dataset, sampler: BucketBatchSampler, epoch: int, start: int, num_workers: int
) -> Iterator[tuple[int, int, list]]:
    """``(epoch, batch index, items)`` forever, starting at ``start`` batches into ``epoch``."""
    while True:
        sampler.set_epoch(epoch)
        batches = list(sampler)[start:]
        if batches:
            loader = torch.utils.data.DataLoader(
                dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_as_list
            )
            for offset, items in enumerate(loader):
                yield epoch, start + offset, items
        epoch, start = epoch + 1, 0


def _total_steps(config: TrainConfig, sizes: list, world: int) -> int:
    # the smallest share decides, so every rank runs the same number of steps
    per_epoch = min(
        len(BucketBatchSampler(sizes, config.batch_size, config.seed, num_replicas=world, rank=r))
        for r in range(world)
    )
    steps_per_epoch = per_epoch // config.gradient_accumulation_steps
    if config.num_epochs is not None and steps_per_epoch == 0:
        raise ConfigError(
            f"one epoch is {per_epoch} micro-batches per process, fewer than --gradient_accumulation_steps "
            f"{config.gradient_accumulation_steps}; lower it or --batch_size, or use --max_steps"
        )
    candidates = [config.max_steps] if config.max_steps is not None else []
    if config.num_epochs is not None:
        candidates.append(config.num_epochs * steps_per_epoch)
    return min(candidates)


def train(config: TrainConfig, on_model_built: ModelBuiltHook | None = None) -> TrainResult:
    accelerator = make_accelerator(config)
    main, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    device, dtype = accelerator.device, model_dtype(config)
    _seed_everything(config.seed)
    output_path = Path(config.output_path)
    if main:
        output_path.mkdir(parents=True, exist_ok=True)

    folders = resolve_base(config)  # once for the run: a hub id downloads here, nowhere else
    backbone = training_backbone(config, folders)
    template = build_template(config, config.seed, backbone.name) if config.uses_template else None
    base = base_model_fingerprint(config, folders)
    if config.task == "train":  # check the cache before loading anything big
        index, items = open_cache(config.cache_path)
        _check_cache(index, config, base, template, backbone.name)
        sizes = items.sizes
    else:
        report, dataset = _dataset(config)
        backbone.check_samples(report.samples)
        items, sizes = SafeItems(dataset), dataset.sizes

    if main:
        check_validation_images(
            config.validation_inputs
        )  # a bad image fails now, not at the first validation
    train_dit = "dit" in config.trainable_models
    dit = load_dit(config, device, torch.float32 if train_dit else dtype, backbone, folders)
    extractor, pipe = None, None
    if config.task == "full" or (config.validation_steps and (main or is_fsdp(accelerator))):
        # text encoder + VAE (features, validation images)
        pipe = load_pipeline(config, device, dtype, backbone=backbone, folders=folders)
    if config.task == "full":
        extractor = FeatureExtractor(
            pipe, base, config.max_sequence_length, config.max_pixels,
            template.model.to(device) if template else None, template.processor if template else None,
        )  # fmt: skip

    model, optimizer = _build_training_module(config, dit, template, device)
    if on_model_built is not None:
        on_model_built(model, optimizer)
    prepare_distributed(
        accelerator, model, dit, config.batch_size, config.max_grad_norm, bool(config.validation_steps)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if is_fsdp(accelerator):
        log_shares(model, rank)
    params = [p for p in model.parameters() if p.requires_grad]

    sampler = BucketBatchSampler(
        sizes, config.batch_size, config.seed, num_replicas=world, rank=accelerator.process_index
    )
    total_steps = _total_steps(config, sizes, world)
    check_run_folder(
        output_path, total_steps, config.save_steps
    )  # before any step: nothing of the user's is replaced
    if main:
        remove_leftovers(output_path)
    resumed = resume_training(config, accelerator, model, optimizer)
    state = TrainingState(num_processes=world) if resumed is None else resumed
    state.num_processes = world
    metrics = MetricsLog(output_path, state.step) if main else None
    logger.info(
        "training %s on %d samples: %d steps of %d x %d x %d samples, from step %d",
        ",".join(config.trainable_models), len(sizes), total_steps, world, config.batch_size,
        config.gradient_accumulation_steps, state.step,
    )  # fmt: skip

    stream = micro_batches(items, sampler, state.epoch, state.batch_in_epoch, config.dataset_num_workers)
    progress = tqdm(total=total_steps, initial=state.step, desc="training", disable=not main)
    losses: list[float] = []
    checkpoint: Path | None = None
    fault_after = int(os.environ[FAULT_STEPS_ENV]) if os.environ.get(FAULT_STEPS_ENV) else None
    step_start = time.perf_counter()
    while state.step < total_steps:
        lr = learning_rate_at(state.step, config, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro_losses, grad_norm, checked_norm, micro_ids = [], None, None, []
        for micro in range(config.gradient_accumulation_steps):
            epoch, batch_index, batch_items = next(stream)
            batch = _features(batch_items, extractor)
            micro_ids.append((epoch, batch_index, [f.id for f in batch]))
            # micro-batch ``micro * world + rank`` of the equivalent one-process run (see the module doc)
            seeds = [noise_seed(config.seed, state.step, micro * world + rank, f.id) for f in batch]
            with accelerator.accumulate(model):
                loss = model(batch, seeds)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    grad_norm = checked_norm = local_norm(
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    )
                elif accelerator.sync_gradients and not is_deepspeed(accelerator):
                    checked_norm = local_norm(
                        _gradient_norm(params)
                    )  # only checked, not logged: clipping is off
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_losses.append(loss.detach().float())
            state.epoch, state.batch_in_epoch = epoch, batch_index + 1
        state.step += 1
        local_losses = torch.stack(micro_losses)
        step_loss = accelerator.reduce(local_losses.mean(), "mean").item()
        _check_finite_step(state.step, step_loss, local_losses, checked_norm, micro_ids)
        losses.append(step_loss)
        seconds = time.perf_counter() - step_start  # data + compute; checkpoints and validation excluded
        if main:
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if state.step % config.log_steps == 0 or state.step == total_steps:
                norm = None if grad_norm is None else float(grad_norm)
                metrics.log(state.step, state.epoch, step_loss, lr, norm, seconds)
        if config.save_steps and state.step % config.save_steps == 0 or state.step == total_steps:
            checkpoint = save_checkpoint(
                accelerator, model, optimizer, output_path, state, config, template,
                dit.config.to_diffusers(),
            )  # fmt: skip
        if config.validation_steps and state.step % config.validation_steps == 0:
            _validate(accelerator, model, pipe, backbone, config, state.step, output_path)
        if fault_after is not None and state.step >= fault_after:
            logger.error("%s=%d: exiting abruptly (test hook)", FAULT_STEPS_ENV, fault_after)
            os._exit(17)
        step_start = time.perf_counter()
    progress.close()
    if metrics is not None:
        metrics.close()
    accelerator.wait_for_everyone()
    return TrainResult(output_path, state.step, checkpoint, losses)


def _gradient_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else None


def _check_finite_step(
    step: int,
    step_loss: float,
    local_losses: torch.Tensor,
    grad_norm: torch.Tensor | None,
    micro_ids: list[tuple[int, int, list[str]]],
) -> None:
    """Stop the run at the first non-finite loss or gradient, naming the step and the batch's samples.

    The weights are already poisoned by then, so no checkpoint is written (``save_checkpoint`` would
    refuse it too); every rank sees the same mean loss and the same all-reduced gradients, so all stop.
    """
    norm = None if grad_norm is None else float(grad_norm)
    if math.isfinite(step_loss) and (norm is None or math.isfinite(norm)):
        return
    finite = torch.isfinite(local_losses.float()).tolist()
    bad = [micro_ids[i] for i, ok in enumerate(finite) if not ok] or micro_ids
    batches = "; ".join(f"epoch {e} batch {b}: samples {ids}" for e, b, ids in bad)
    if math.isfinite(step_loss):
        what = f"the gradient norm is {norm} at optimizer step {step} (loss {step_loss:.6g}); {batches}"
    elif not all(finite):
        what = f"the loss is {step_loss} at optimizer step {step}; non-finite for {batches}"
    else:
        what = (
            f"the loss averaged over processes is {step_loss} at optimizer step {step}: another process's "
            f"batch is non-finite (this process's were finite: {batches})"
        )
    raise NonFiniteError(
        f"training stopped: {what}. No checkpoint was written for this step. Check those samples' "
        "features, lower --learning_rate or keep --max_grad_norm on, and resume from the last checkpoint"
    )


def _check_cache(
    index: dict[str, Any], config: TrainConfig, base: dict[str, str], template, backbone: str
) -> None:
    """Stage II refuses a cache made from other inputs; the DiT is not part of it (features never see it)."""
    parts = [*_ALWAYS, *(_TEMPLATE if template else ())]
    dataset_fp = None
    if config.dataset_metadata_path:
        parts.append("dataset")
        dataset_fp = dataset_fingerprint(config)
    current = feature_fingerprint(config, base, template, dataset_fp, backbone)
    check_fingerprint({**index, "fingerprint": _cached_fingerprint(index)}, current, parts, Path(config.cache_path),
                      "Rerun --task data_process with the current settings into a new --cache_path.")  # fmt: skip
    if index["fingerprint"].get("processing_seed") != config.seed:
        logger.warning(
            "the cache was processed with --seed %s and this run uses %s: random per-sample processing "
            "(masks, crops) follows the cache", index["fingerprint"].get("processing_seed"), config.seed,
        )  # fmt: skip
    if index["skipped"]:
        logger.warning("the cache skipped %d samples in stage I (see its index.json)", len(index["skipped"]))


def _build_training_module(config: TrainConfig, dit, template: TemplateHandle | None, device):
    train_dit = "dit" in config.trainable_models
    dit.requires_grad_(train_dit)
    if config.use_gradient_checkpointing:
        dit.enable_gradient_checkpointing()
    template_model = None
    if template is not None:
        template_model = template.model.to(device)
        _init_from_dit(config, template_model, dit)
        template_model.requires_grad_(config.trains_template).train(config.trains_template)
    dit_lora = None
    if "dit_lora" in config.trainable_models:
        dit_lora = DiTLoRA(
            dit, config.lora_rank, config.lora_target_modules, config.lora_alpha, seed=config.seed
        )
    model = TrainingModule(
        dit,
        template_model,
        dit_lora,
        TRAINING_MU,
        config.use_gradient_checkpointing,
        config.gradient_checkpointing_offload,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            f"--trainable_models {config.trainable_models} leaves nothing to train (the template has no parameters?)"
        )
    logger.info("trainable parameters: %.3f M", sum(p.numel() for p in params) / 1e6)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return model, optimizer


def _init_from_dit(config: TrainConfig, template_model, dit) -> None:
    """A fresh template starts from the base DiT where its architecture can (a resumed run then loads
    its checkpoint over this, so the start does not matter there)."""
    if (
        config.architecture is None
        or config.template_init != "dit"
        or not hasattr(template_model, "init_from_dit")
    ):
        return
    copied = template_model.init_from_dit(dit)
    logger.info("--template_init dit: %d tensors of the template start as the base DiT's", len(copied))


def _features(items: list, extractor: FeatureExtractor | None) -> list[SampleFeatures]:
    """Stage II: the items already are features. Full: extract them now, skipping unusable samples."""
    if extractor is None:
        return items
    batch = []
    for item in items:
        try:
            batch.append(extractor(item))
        except SampleSkipped as e:
            logger.warning("skipping sample %s (metadata line %s): %s", item["id"], item["line"], e)
    return batch


def _validate(
    accelerator, model, pipe, backbone: TrainingBackbone, config: TrainConfig, step: int, output_path: Path
) -> None:
    sharded = is_fsdp(accelerator)  # the sharded DiT runs on every rank together; rank 0 writes the grid
    if accelerator.is_main_process or sharded:
        unwrapped = accelerator.unwrap_model(model)
        dit, template = unwrapped.dit, unwrapped.template
        runner = backbone.runner(dit, pipe)
        modules = [m for m in (template, unwrapped.dit_lora) if m is not None]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with unsharded_root(model) if sharded else contextlib.nullcontext():
                images = render_validation(runner, config.validation_inputs, template, unwrapped.dit_lora)
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        if accelerator.is_main_process:
            path = save_grid(images, output_path / "validation" / f"step-{step}.png")
            logger.info("validation images: %s", path)
    accelerator.wait_for_everyone()
