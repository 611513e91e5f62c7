"""A DiT from one ``.safetensors`` file, in the family's native layout (FLUX.2: BFL / ComfyUI
``double_blocks.N.img_attn.qkv.weight``; Z-Image: the official ``layers.N.attention.qkv.weight``) or in
ours (diffusers' names), full precision or ComfyUI fp8 (``float8`` weights with a ``scale_weight`` /
``weight_scale`` tensor each, dequantized to the compute dtype on load).

The layout is read from the keys; the config comes from the model folder's ``transformer/config.json``
when there is one, else (FLUX.2) from the tensors' shapes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..loading.meta_init import meta_build
from ..loading.model_loading import load_module_from_state_dict, read_config
from ..loading.safetensors_io import CheckpointError, load_safetensors
from .families import Family
from .families.checkpoint_layout import join, parameter_modules
from .lora_files import swap_halves

logger = logging.getLogger(__name__)

SCALE_SUFFIXES = ("scale_weight", "weight_scale")  # ComfyUI's fp8_scaled / newer quantized files
IGNORED_SUFFIXES = ("scale_input", "input_scale", "comfy_quant")  # activation scales: not used here
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


class SingleFileError(CheckpointError):
    """A single-file checkpoint this library cannot read (unknown layout, odd quantization)."""


def is_single_file(path: str | os.PathLike) -> bool:
    return str(path).endswith(".safetensors") and Path(path).is_file()


def dequantize(state: dict[str, Tensor], source: str, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """fp8 weights times their scale (per tensor or per output row), computed in float32 and kept in
    ``dtype`` (default float32); scale and marker keys dropped. An fp8 weight without a scale is a
    plain cast (scale 1)."""
    out = {}
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in SCALE_SUFFIXES or leaf in IGNORED_SUFFIXES or key == "scaled_fp8":
            continue
        if value.dtype in FP8_DTYPES:
            scale = next((state[f"{module}.{s}"] for s in SCALE_SUFFIXES if f"{module}.{s}" in state), None)
            value = value.float()
            if scale is not None:
                value = value * _broadcast_scale(scale.float(), value, key, source)
            value = value.to(dtype or torch.float32)
        out[key] = value
    return out


def _broadcast_scale(scale: Tensor, weight: Tensor, key: str, source: str) -> Tensor:
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == weight.shape[0]:
        return scale.reshape(-1, *([1] * (weight.ndim - 1)))
    raise SingleFileError(
        f"{source}: the scale of {key!r} has shape {tuple(scale.shape)}; only per-tensor and per-output-row "
        f"scales of an fp8 weight {tuple(weight.shape)} are supported (block-wise quantized files are not)"
    )


def to_our_names(
    state: dict[str, Tensor], family: Family, model: nn.Module, source: str
) -> dict[str, Tensor]:
    """The tensors under our parameter names, from our (diffusers') naming or the family's native one."""
    layout = family.checkpoint_layout
    ours = set(model.state_dict())
    plain = {k.removeprefix("transformer."): v for k, v in state.items()}
    if set(plain) == ours or layout is None:
        return plain
    stripped = {layout.strip(k): v for k, v in state.items() if layout.strip(k) not in layout.unused_keys}
    out, missing, used = {}, [], set()
    for name in parameter_modules(model):
        slot = layout.slot(name)
        renames = dict(slot.params) if slot else {}
        for param, _ in model.get_submodule(name).named_parameters(recurse=False):
            key = join(slot.module, renames.get(param, param)) if slot else None
            if key not in stripped:
                missing.append(key or join(name, param))
                continue
            used.add(key)
            value = swap_halves(stripped[key]) if slot.swap_halves else stripped[key]
            if slot.chunks > 1:
                value = value.chunk(slot.chunks)[slot.index]
            out[join(name, param)] = value.contiguous()
    unexpected = sorted(set(stripped) - used)
    if missing or unexpected:
        native = sum(layout.is_native(k) for k in state)
        raise SingleFileError(
            f"{source} is neither in our (diffusers) naming nor in the {layout.title} layout of a "
            f"{family.title} DiT of this config ({native} of its {len(state)} keys look native): "
            f"missing {sorted(missing)[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    return out


def load_single_file_dit(
    family: Family,
    path: str | os.PathLike,
    config_folder: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: Any = None,
) -> nn.Module:
    """``family``'s DiT from one safetensors file (see the module docstring), frozen in eval mode."""
    source = f"single-file transformer {str(path)!r}"
    if not str(path).endswith(".safetensors"):
        raise SingleFileError(f"{source} must be a .safetensors file (pickled checkpoints are refused)")
    state = dequantize(load_safetensors(path), source, torch_dtype)
    if config is None:
        config = _config(family, state, config_folder, source)
    with meta_build():
        skeleton = family.dit_class(config)
    state = to_our_names(state, family, skeleton, source)
    floats = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype = torch_dtype or (floats.pop() if len(floats) == 1 else torch.float32)
    logger.info("loading %s (%d tensors) as %s", source, len(state), family.dit_class.__name__)
    return load_module_from_state_dict(
        lambda: family.dit_class(config), state, source=source, torch_dtype=dtype, device=device
    )


def _config(family: Family, state: dict[str, Tensor], folder, source: str):
    if folder is not None and (Path(folder) / "config.json").is_file():
        return family.dit_config_class.from_diffusers(read_config(folder))
    infer = getattr(family.checkpoint_layout, "infer_config", None)
    if infer is None:
        raise SingleFileError(
            f"{source}: a {family.title} single file needs the model's transformer/config.json: pass --model "
            "(a folder or id with transformer/config.json) alongside it"
        )
    try:
        return infer({family.checkpoint_layout.strip(k): tuple(v.shape) for k, v in state.items()})
    except (KeyError, ValueError, IndexError) as e:
        raise SingleFileError(
            f"{source}: cannot read a {family.title} config from its tensors ({e}); it is not a "
            f"{family.checkpoint_layout.title} transformer: pass --model with a transformer/config.json"
        ) from e


def load_family_dit(family: Family, folders, torch_dtype, device) -> nn.Module:
    """The DiT of ``folders`` (``pipelines.common.ComponentFolders``): its single file when
    ``--transformer`` named one, else its ``transformer/`` folder."""
    single = getattr(folders, "single_files", {}).get("transformer")
    if single is not None:
        return load_single_file_dit(family, single, folders["transformer"], torch_dtype, device)
    return family.dit_class.from_pretrained(folders["transformer"], torch_dtype=torch_dtype, device=device)
