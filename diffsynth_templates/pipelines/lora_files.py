"""The ecosystem's LoRA files: read BFL / ai-toolkit / ComfyUI, kohya and diffusers / PEFT LoRAs into
our LoRA cache (``{module}.lora_A.weight`` / ``.lora_B.weight`` on our DiT's Linear paths), and write
ours back in the native (ComfyUI) or the diffusers layout.

Which layout a key is in is read from the key itself: kohya's ``lora_unet_`` + the module path with
underscores, the family's native module names (``families/*_layouts.py``), or ours (diffusers').
``lora_down``/``lora_up`` + ``alpha`` fold ``alpha / rank`` into B. A fused native projection (FLUX.2's
``img_attn.qkv``) becomes one LoRA per projection: B split along its output, the shared A kept.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..loading.meta_init import meta_build
from ..loading.paths import resolve_inside
from ..loading.resolve import resolve_model_path
from ..loading.safetensors_io import load_safetensors, save_safetensors_atomic
from .families import FAMILIES, Family
from .families.checkpoint_layout import CheckpointLayout, Slot, linear_modules
from .lora import LoRAError, split_lora

KOHYA_PREFIX = "lora_unet_"
PEFT_PREFIX = "base_model.model."
EXPORT_FORMATS = ("comfyui", "diffusers")
_PARTS = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".alpha": "alpha",
}
_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def read_lora_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A LoRA file's tensors (safetensors only: a pickle can run code)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoRAError(
            f"LoRA file {str(path)!r} must be a .safetensors file (pickled .pt/.ckpt files are refused)"
        )
    if not path.is_file():
        raise LoRAError(f"LoRA file {str(path)!r} does not exist")
    return load_safetensors(path)


def lora_layout_name(keys, layout: CheckpointLayout | None) -> str:
    """How messages name the layout of a LoRA file's keys."""
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if layout is not None and any(layout.is_native(k) for k in keys):
        return layout.name
    return "diffusers"


def convert_lora(
    state: Mapping[str, Tensor], family: Family, model: nn.Module, source: str = "LoRA"
) -> dict[str, Tensor]:
    """Our LoRA cache (float32) from a LoRA file's tensors in any known layout of ``family``."""
    dora = [k for k in state if "lora_magnitude_vector" in k or "dora_scale" in k]
    if dora:
        raise LoRAError(
            f"{source} is a DoRA ({dora[0]!r}): DoRA's magnitude vectors are not supported; "
            "use a plain LoRA (or merge the DoRA into the weights first)"
        )
    layout = family.checkpoint_layout
    linears = linear_modules(model)
    ours = set(linears)
    groups = layout.native_groups(linears) if layout is not None else {}
    kohya = {KOHYA_PREFIX + name.replace(".", "_"): name for name in [*groups, *ours]}
    parts, odd = _group_parts(state, layout, kohya)
    if odd:
        raise LoRAError(
            f"{source}: {len(odd)} keys are not LoRA weights ('{{module}}.lora_A.weight' / '.lora_B.weight', "
            f"'.lora_down.weight' / '.lora_up.weight', '.alpha'), first: {odd[:5]}"
        )
    lora: dict[str, Tensor] = {}
    unmatched = []
    for module, p in parts.items():
        targets = [(module, Slot(module))] if module in ours else groups.get(module)
        if targets is None:
            unmatched.append(module)
            continue
        a, b = _pair(module, p, source)
        for name, slot in targets:
            lora[f"{name}.lora_A.weight"] = a
            lora[f"{name}.lora_B.weight"] = _slot_rows(b, slot, module, source)
    if unmatched:
        raise LoRAError(_unmatched_message(source, family, unmatched, len(parts) - len(unmatched), state))
    if not lora:
        raise LoRAError(f"{source} holds no LoRA weights")
    return lora


def _group_parts(state, layout, kohya) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    parts: dict[str, dict[str, Tensor]] = {}
    odd = []
    for key, value in state.items():
        k = key.removeprefix(PEFT_PREFIX)
        k = layout.strip(k) if layout is not None else k.removeprefix("transformer.")
        for suffix, part in _PARTS.items():
            if k.endswith(suffix):
                module = k[: -len(suffix)]
                parts.setdefault(kohya.get(module, module), {})[part] = value
                break
        else:
            odd.append(key)
    return parts, odd


def _pair(module: str, p: dict[str, Tensor], source: str) -> tuple[Tensor, Tensor]:
    if "A" not in p or "B" not in p:
        missing = "lora_A / lora_down" if "A" not in p else "lora_B / lora_up"
        raise LoRAError(f"{source}: module {module!r} has no {missing} weight")
    a, b = p["A"].float(), p["B"].float()
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise LoRAError(
            f"{source}: module {module!r} has A {tuple(a.shape)} and B {tuple(b.shape)}; "
            "expected [rank, in] and [out, rank] (a Linear LoRA)"
        )
    if "alpha" in p:  # kohya / ComfyUI: the delta is B @ A * alpha / rank
        b = b * (float(p["alpha"].float().reshape(-1)[0]) / a.shape[0])
    return a, b


def _slot_rows(b: Tensor, slot: Slot, module: str, source: str) -> Tensor:
    if slot.swap_halves:
        b = swap_halves(b)
    if slot.chunks == 1:
        return b
    if b.shape[0] % slot.chunks:
        raise LoRAError(
            f"{source}: fused module {module!r} has {b.shape[0]} output rows, not a multiple of {slot.chunks}"
        )
    return b.chunk(slot.chunks)[slot.index].contiguous()


def swap_halves(t: Tensor) -> Tensor:
    """(shift, scale) rows <-> (scale, shift) rows."""
    first, second = t.chunk(2)
    return torch.cat([second, first])


def _pattern(name: str) -> str:
    return _INDEX.sub("N", name)


def _unmatched_message(source, family: Family, unmatched: list[str], matched: int, state) -> str:
    unmatched = sorted(unmatched)
    msg = (
        f"{source} ({lora_layout_name(state, family.checkpoint_layout)} layout) has {len(unmatched)} "
        f"modules the {family.title} DiT does not have, first: {unmatched[:5]}; {matched} matched"
    )
    wanted = {_pattern(n) for n in unmatched}
    for other in FAMILIES.values():
        if other is family:
            continue
        with meta_build():
            dit = other.dit_class(other.tiny_config())
        names = linear_modules(dit)
        layout = other.checkpoint_layout
        known = {_pattern(n) for n in [*names, *(layout.native_groups(names) if layout else {})]}
        known |= {_pattern(KOHYA_PREFIX + n.replace(".", "_")) for n in known}
        if wanted <= known:
            return msg + f": this LoRA is for {other.title}, load it into a {other.title} pipeline"
    return msg + f": is it a LoRA for {family.title}?"


# -- export -------------------------------------------------------------------------------------------


def export_lora(lora: Mapping[str, Tensor], family: Family, fmt: str) -> dict[str, Tensor]:
    """Our LoRA cache as a file other tools load: ``"diffusers"`` (``transformer.{module}.lora_A.weight``,
    diffusers' ``load_lora_weights``) or ``"comfyui"`` (``diffusion_model.{native module}.lora_A.weight``,
    ComfyUI, ai-toolkit and diffusers). Alpha is folded in already (no ``.alpha`` keys: scale 1)."""
    pairs = split_lora(lora, "the exported LoRA")
    if fmt == "diffusers":
        out = {}
        for name, (a, b) in pairs.items():
            out[f"transformer.{name}.lora_A.weight"] = a
            out[f"transformer.{name}.lora_B.weight"] = b
        return out
    if fmt != "comfyui":
        raise LoRAError(f"LoRA export format {fmt!r} is not one of {EXPORT_FORMATS}")
    layout = family.checkpoint_layout
    if layout is None:
        raise LoRAError(f"{family.title} has no native checkpoint layout to export to; use 'diffusers'")
    missing = sorted(set(pairs) - set(layout.slots(pairs)))
    if missing:
        raise LoRAError(f"modules {missing[:5]} have no name in the {layout.title} layout; use 'diffusers'")
    out = {}
    for native, members in layout.native_groups(pairs).items():
        a, b = _fuse([(pairs[name], slot) for name, slot in members])
        out[f"{layout.export_prefix}{native}.lora_A.weight"] = a
        out[f"{layout.export_prefix}{native}.lora_B.weight"] = b
    return out


def _fuse(members: list[tuple[tuple[Tensor, Tensor], Slot]]) -> tuple[Tensor, Tensor]:
    """One native LoRA from the LoRAs of its chunks: a shared A stays shared, otherwise A is stacked
    along the rank and B is block-diagonal (a chunk without a LoRA gets zero rows)."""
    slot0 = members[0][1]
    if slot0.chunks == 1:
        (a, b), slot = members[0]
        return a, swap_halves(b) if slot.swap_halves else b
    rows = members[0][0][1].shape[0]
    a_all = [a for (a, _), _ in members]
    if len(members) == slot0.chunks and all(torch.equal(a, a_all[0]) for a in a_all):
        return a_all[0], torch.cat([b for (_, b), _ in members])
    a = torch.cat(a_all)
    b = a.new_zeros(rows * slot0.chunks, a.shape[0])
    col = 0
    for (ai, bi), slot in members:
        b[slot.index * rows : (slot.index + 1) * rows, col : col + ai.shape[0]] = bi
        col += ai.shape[0]
    return a, b


def save_lora_file(lora: Mapping[str, Tensor], path: str | os.PathLike, family: Family, fmt: str) -> Path:
    """Write ``export_lora(lora, family, fmt)`` to ``path`` atomically."""
    tensors = export_lora(lora, family, fmt)
    save_safetensors_atomic(tensors, path, metadata={"format": "pt", "lora_layout": fmt})
    return Path(path)


def resolve_lora_source(
    source: str | os.PathLike, cache_dir: str | os.PathLike | None = None, offline: bool | None = None
) -> Path:
    """A local LoRA file, or one file of a ModelScope repo: ``owner/name/path/in/repo.safetensors``
    (downloaded once into the model cache, only that file)."""
    path = Path(source).expanduser()
    if path.exists() or os.path.isabs(str(source)):
        return path
    parts = str(source).split("/")
    if len(parts) < 3:
        raise LoRAError(
            f"LoRA {str(source)!r} is not an existing file and not a ModelScope file "
            "'owner/name/path/to/lora.safetensors'"
        )
    repo, inner = "/".join(parts[:2]), "/".join(parts[2:])
    root = resolve_model_path(repo, allow_patterns=[inner], cache_dir=cache_dir, offline=offline)
    return resolve_inside(root, inner, f"LoRA file of {repo!r}")
