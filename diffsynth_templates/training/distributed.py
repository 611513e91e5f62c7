"""Sharded training (FSDP2 through accelerate): wrapping, and the gathered state checkpoints hold.

Under FSDP2 (``scripts/accelerate_fsdp2.yaml``, ``fsdp_version: 2``) every DiT block is its own
``fully_shard`` group and the rest of the training module (template, DiT LoRA, the DiT's embedders)
is the root group; parameters, gradients and optimizer state are ``DTensor`` shards, the frozen DiT
included, so their memory divides by the number of processes.

Checkpoints stay in the single-process layout: each trained tensor and each optimizer-state tensor is
all-gathered one at a time (``full_tensor``), checked finite on every rank (all ranks reach the same
verdict), and kept only on rank 0, which writes the usual safetensors files. Resuming reads those files
on every rank and cuts each tensor back into this rank's shard (``distribute_tensor``). Nothing is
pickled and there is no DCP metadata; a checkpoint written by any mode resumes in any other (with the
same number of processes for the same data order).

accelerate only enables FSDP on accelerators; on CPU (the tests: gloo) it falls back to DDP.
``enable_cpu_fsdp`` switches its state to FSDP there, so the tests run accelerate's own FSDP2 path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..loading.finite import NonFiniteError
from .backbones import UnsupportedFeatureError

logger = logging.getLogger(__name__)

TensorCheck = Callable[[str, Tensor], None]


def fsdp_requested() -> bool:
    """``accelerate launch`` with an FSDP config sets this for the training processes."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def process_group_backend() -> str | None:
    """gloo for DeepSpeed on its CPU accelerator (``DS_ACCELERATOR=cpu``); otherwise accelerate's choice.

    Without it accelerate finds no device backend on CPU and takes the run for a single process
    (every rank would be rank 0 of 1) while DeepSpeed itself starts all of them.
    """
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    return "gloo" if deepspeed and os.environ.get("DS_ACCELERATOR") == "cpu" else None


def enable_cpu_fsdp(accelerator) -> None:
    """On CPU, make accelerate's state FSDP as the launch asked (accelerate only does so on accelerators).

    accelerate builds the FSDP plugin from the launch environment either way; it just keeps CPU runs
    on DDP. Everything after this (``prepare``, ``accumulate``, ``clip_grad_norm_``) is accelerate's
    FSDP2 code, the same that runs on GPUs.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # read from the launch environment, as accelerate does
    if plugin.fsdp_version != 2:
        raise UnsupportedFeatureError(
            f"the accelerate config asks for FSDP version {plugin.fsdp_version}; this trainer supports "
            "fsdp_version: 2 (scripts/accelerate_fsdp2.yaml)"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    logger.info("FSDP2 on CPU (gloo): %d processes", state.num_processes)


def is_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def is_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def main_process_error(accelerator, error: NonFiniteError | None) -> NonFiniteError | None:
    """Rank 0's verdict on every rank (where only rank 0 could check): all raise alike, none waits forever."""
    from accelerate.utils import broadcast_object_list

    message = broadcast_object_list([None if error is None else str(error)])[0]
    if message is None or error is not None:
        return error
    return NonFiniteError(message)


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp(accelerator) -> None:
    """FSDP1 and the plugin's own activation checkpointing are refused: use version 2 and our flag."""
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version != 2:
        raise UnsupportedFeatureError(
            f"the accelerate config asks for FSDP version {plugin.fsdp_version}; use fsdp_version: 2 "
            "(scripts/accelerate_fsdp2.yaml)"
        )
    if plugin.activation_checkpointing:
        raise UnsupportedFeatureError(
            "fsdp_activation_checkpointing: true wraps the DiT's blocks behind its back; set it to false "
            "and pass --use_gradient_checkpointing instead (the DiT checkpoints its own blocks)"
        )


def prepare_distributed(
    accelerator,
    model: nn.Module,
    dit: nn.Module,
    batch_size: int,
    max_grad_norm: float | None,
    validation: bool = False,
) -> None:
    """What accelerate needs before ``prepare``: FSDP2's shard groups, DeepSpeed's ``"auto"`` entries.
    ``validation``: the run renders validation images (refused under ZeRO-3, before any step)."""
    if validation and is_zero3(accelerator):
        raise UnsupportedFeatureError(
            "validation images need the whole DiT on one process, which ZeRO-3 partitions: use "
            "scripts/accelerate_deepspeed_zero2.yaml or scripts/accelerate_fsdp2.yaml, or drop --validation_steps"
        )
    if is_fsdp(accelerator):
        mark_shard_groups(model, dit)
        plugin = accelerator.state.fsdp_plugin
        policy = plugin.mixed_precision_policy
        if policy is not None and getattr(policy, "reduce_dtype", None) not in (None, torch.float32):
            # bf16 compute, but gradients averaged in fp32 like DDP (accelerate would reduce in bf16)
            plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)
            logger.info("FSDP2: compute in %s, gradients reduced in torch.float32", policy.param_dtype)
    if is_deepspeed(accelerator):  # entries accelerate cannot fill without a prepared DataLoader
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = batch_size
        if ds_config.get("gradient_clipping", "auto") == "auto":  # DeepSpeed clips inside its own step
            ds_config["gradient_clipping"] = max_grad_norm or 0.0


def block_class_names(dit: nn.Module) -> list[str]:
    """The classes of the DiT's blocks (the modules in its top-level ``ModuleList``s): one shard group each."""
    names: list[str] = []
    for child in dit.children():
        if isinstance(child, nn.ModuleList):
            for block in child:
                name = type(block).__name__
                if name not in names and any(True for _ in block.parameters()):
                    names.append(name)
    return names


def mark_shard_groups(model: nn.Module, dit: nn.Module) -> None:
    """accelerate's TRANSFORMER_BASED_WRAP reads ``_no_split_modules``: the DiT's block classes."""
    names = block_class_names(dit)
    if not names:
        raise UnsupportedFeatureError(f"{type(dit).__name__} has no block list to shard with FSDP2")
    model._no_split_modules = names
    logger.info("FSDP2: one shard group per %s", ", ".join(names))


def local_bytes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{"frozen"|"trained": (bytes on this rank, bytes of the whole tensors)}`` of the parameters."""
    from torch.distributed.tensor import DTensor

    out = {"frozen": [0, 0], "trained": [0, 0]}
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        entry = out["trained" if p.requires_grad else "frozen"]
        entry[0] += local.numel() * local.element_size()
        entry[1] += p.numel() * p.element_size()
    return {k: (v[0], v[1]) for k, v in out.items()}


def log_shares(model: nn.Module, rank: int) -> None:
    shares = local_bytes(model)
    logger.info(
        "FSDP2 rank %d holds %s",
        rank,
        ", ".join(
            f"{k} {mine / 2**20:.3f} of {whole / 2**20:.3f} MiB" for k, (mine, whole) in shares.items()
        ),
    )


# --------------------------------------------------------------------------------------------------
# gathering for checkpoints, sharding for resume
# --------------------------------------------------------------------------------------------------


def _full(tensor: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather_tensors(named: Iterable[tuple[str, Tensor]], keep: bool, check: TensorCheck) -> dict[str, Tensor]:
    """Each tensor whole (a collective: every rank calls this with the same names, in the same order).

    ``check`` runs on every rank for every tensor (same values, same verdict); only ``keep`` ranks
    hold the results, on the CPU, so other ranks never hold more than one whole tensor at a time.
    """
    out: dict[str, Tensor] = {}
    for name, tensor in named:
        whole = _full(tensor.detach())
        check(name, whole)
        if keep:
            out[name] = whole.cpu()
    return out


def gather_optimizer_state(state_dict: dict, keep: bool, check: TensorCheck) -> dict:
    """``optimizer.state_dict()`` with every sharded state tensor whole (param ids in sorted order)."""
    state: dict = {}
    for param_id in sorted(state_dict["state"]):
        entries = state_dict["state"][param_id]
        names = sorted(entries)
        tensors = [(f"state/{param_id}/{k}", entries[k]) for k in names if isinstance(entries[k], Tensor)]
        whole = gather_tensors(tensors, keep, check)
        if keep:
            state[param_id] = {k: whole.get(f"state/{param_id}/{k}", entries[k]) for k in names}
    return {"state": state, "param_groups": state_dict["param_groups"]} if keep else {}


def shard_like(reference: Tensor, whole: Tensor) -> Tensor:
    """``whole`` cut into this rank's shard the way ``reference`` (a sharded parameter) is; as is otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor) or whole.shape != reference.shape:
        return whole
    local = whole.to(device=reference.device, dtype=reference.dtype)
    return distribute_tensor(local, reference.device_mesh, reference.placements)


def shard_state_dict(module: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole-tensor state dict for ``module``, sharded like its parameters (unknown names pass through)."""
    current = module.state_dict()
    return {k: shard_like(current[k], v) if k in current else v for k, v in tensors.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
    """A whole-tensor optimizer state, sharded like the parameters it belongs to (param ids in order)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for param_id, entries in state_dict["state"].items():
        param = params[int(param_id)] if int(param_id) < len(params) else None
        state[param_id] = {
            k: shard_like(param, v) if param is not None and isinstance(v, Tensor) else v
            for k, v in entries.items()
        }
    return {**state_dict, "state": state}


def local_norm(norm: Tensor | None) -> Tensor | None:
    """A gradient norm as a plain tensor (FSDP2's is a replicated ``DTensor``)."""
    return None if norm is None else _full(norm)


@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[None]:
    """The root group's parameters whole (embedders, template, LoRA), so the DiT can be called outside the
    training module's forward (validation); each block still gathers itself in its own forward."""
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
