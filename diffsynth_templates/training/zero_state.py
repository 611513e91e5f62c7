"""Exact-resume state under DeepSpeed ZeRO-2/3, in the single-process layout (no DeepSpeed checkpoint files).

DeepSpeed's own ``save_checkpoint`` pickles (``torch.save``). Instead, each trained parameter's fp32
optimizer state (Adam's moments) is gathered whole through DeepSpeed's public accessors
(``deepspeed.utils.safe_get_full_optimizer_state``: a collective, every rank calls it in the same
order), so the checkpoint's ``optimizer.safetensors`` is what one process would have written, param
ids in the order of the trainable parameters. Resuming writes each tensor back into this rank's
partition (``safe_set_full_*``), the fp32 master weights included; under ZeRO-3 the module's own
partitioned weights are written inside ``GatheredParameters``.

Only imported when the run is under DeepSpeed (accelerate imported ``deepspeed`` already).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

TensorCheck = Callable[[str, Tensor], None]


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer was built with, in its order (``trainer._build_training_module``)."""
    return [p for p in module.parameters() if p.requires_grad]


def _base_optimizer(optimizer) -> torch.optim.Optimizer:
    """accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer over flat partitions."""
    return optimizer.optimizer.optimizer


def _shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 parameters are empty outside a forward


def gather_zero_optimizer_state(
    optimizer, params: list[nn.Parameter], keep: bool, check: TensorCheck
) -> dict:
    """The optimizer state dict one process would have (``{"state": {i: ...}, "param_groups": ...}``)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(optimizer)
    first = next(iter(base.state.values()), None)
    if first is None:  # no step taken yet
        return {"state": {}, "param_groups": _param_groups(base, len(params))} if keep else {}
    keys = sorted(k for k, v in first.items() if k != "step" and isinstance(v, Tensor))
    state = {}
    for i, param in enumerate(params):
        entry: dict = {"step": first["step"].detach().clone().cpu()} if "step" in first else {}
        for key in keys:
            whole = safe_get_full_optimizer_state(param, key).detach().reshape(_shape(param))
            check(f"state/{i}/{key}", whole)
            entry[key] = whole.cpu()
        if keep:
            state[i] = entry
    return {"state": state, "param_groups": _param_groups(base, len(params))} if keep else {}


def _param_groups(base: torch.optim.Optimizer, count: int) -> list[dict]:
    """One process's groups: the hyperparameters of DeepSpeed's (one group of trainable parameters)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    return [{**groups[0], "params": list(range(count))}]


def load_zero_state(optimizer, module: nn.Module, weights: dict[str, Tensor], optimizer_state: dict) -> None:
    """Write whole weights (named as in ``module.state_dict()``) and optimizer state into this rank's partitions."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    named = {name: p for name, p in module.named_parameters() if p.requires_grad}
    params = trainable(module)
    with torch.no_grad():
        zero3 = [p for p in named.values() if hasattr(p, "ds_id")]
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0, enabled=bool(zero3)):
            for name, param in named.items():
                if name in weights:
                    param.data.copy_(weights[name].to(param.device, param.dtype).reshape(param.shape))
        for name, param in named.items():
            if name in weights:
                safe_set_full_fp32_param(param, weights[name].to(param.device, torch.float32))
    base = _base_optimizer(optimizer)
    _create_state(optimizer, base, optimizer_state)
    steps = set()
    for i, param in enumerate(params):
        for key, value in optimizer_state["state"].get(i, {}).items():
            if key == "step":
                steps.add(float(value))
            elif isinstance(value, Tensor):
                safe_set_full_optimizer_state(param, value.to(torch.float32), key)
    if steps:
        step = steps.pop()
        for entry in base.state.values():
            if "step" in entry:
                entry["step"] = torch.tensor(step, dtype=entry["step"].dtype, device=entry["step"].device)
    for group in base.param_groups:  # the LR is set per step by the trainer; the rest as saved
        saved = optimizer_state["param_groups"][0]
        group.update({k: v for k, v in saved.items() if k not in ("params", "lr")})


def _create_state(optimizer, base: torch.optim.Optimizer, optimizer_state: dict) -> None:
    """Adam creates its state at the first step; a resumed run has taken none, so create it (zeros, then
    overwritten) and let DeepSpeed link each parameter's fragment to it, as it does after a first step."""
    saved = next(iter(optimizer_state["state"].values()), {})
    keys = [k for k, v in saved.items() if k != "step" and isinstance(v, Tensor)]
    zero = optimizer.optimizer
    flats = [p for g in base.param_groups for p in g["params"]]
    flats += [p for p in getattr(zero, "fp32_partitioned_groups_flat", []) if all(p is not f for f in flats)]
    if not keys or all(base.state.get(p) for p in flats):
        return
    for flat in flats:
        entry = base.state[flat]
        entry.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
        for key in keys:
            entry.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link fragments after a first step
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
