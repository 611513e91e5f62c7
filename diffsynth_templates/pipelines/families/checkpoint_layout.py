"""How a backbone's native checkpoints (the model authors' own naming, as BFL / ComfyUI / ai-toolkit
files use it) name our DiT's modules: one ``CheckpointLayout`` per family, in its ``*_layouts.py``.

A layout is a function from one of our module paths to its ``Slot`` in the native file: the native
module, which equal chunk of that module's output rows it is (fused QKV), whether the output halves
are swapped (AdaLN shift/scale order) and which parameters are spelled differently. Everything else
(LoRA files, their export, single-file transformers) is generic over it (``pipelines/lora_files.py``,
``pipelines/single_file.py``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Slot:
    """Where one of our modules sits in a native checkpoint."""

    module: str  # the native module path
    index: int = 0  # which of ``chunks`` equal blocks of the native output rows is ours
    chunks: int = 1
    swap_halves: bool = False  # native output rows are (shift, scale); ours (scale, shift)
    params: tuple[tuple[str, str], ...] = ()  # (ours, native) parameter names that differ


@dataclass(frozen=True)
class CheckpointLayout:
    """A family's native naming (e.g. FLUX.2's BFL ``double_blocks.N.img_attn.qkv``)."""

    name: str  # "bfl", "official": what messages and ``--lora_export_format`` call it
    title: str
    prefixes: tuple[str, ...]  # key prefixes tools add, stripped on read ("diffusion_model.", ...)
    pattern: str  # a regex found in a key (after the prefix) only in this layout: how messages name it
    slot: Callable[[str], Slot | None]  # our module path -> its native slot (None: not in the layout)
    export_prefix: str = "diffusion_model."  # what exported LoRA keys start with (ComfyUI reads it)
    # {native key: shape} of a single file -> the DiT config it was saved from (None: needs config.json)
    infer_config: Callable[[dict[str, tuple[int, ...]]], Any] | None = None
    unused_keys: tuple[str, ...] = ()  # native single-file keys the model does not use (dropped on load)

    def strip(self, key: str) -> str:
        for prefix in self.prefixes:
            if key.startswith(prefix):
                return key[len(prefix) :]
        return key

    def is_native(self, key: str) -> bool:
        return re.search(self.pattern, self.strip(key)) is not None

    def slots(self, modules: Iterable[str]) -> dict[str, Slot]:
        """Our module path -> its slot, for the modules that have one."""
        return {name: s for name in modules if (s := self.slot(name)) is not None}

    def native_groups(self, modules: Iterable[str]) -> dict[str, list[tuple[str, Slot]]]:
        """Native module -> the ``(our module, slot)``s it holds, in chunk order."""
        groups: dict[str, list[tuple[str, Slot]]] = {}
        for name, s in self.slots(modules).items():
            groups.setdefault(s.module, []).append((name, s))
        return {k: sorted(v, key=lambda e: e[1].index) for k, v in groups.items()}


def join(module: str, leaf: str) -> str:
    """``module.leaf``, or ``leaf`` for the root module (``""``)."""
    return f"{module}.{leaf}" if module else leaf


def parameter_modules(model: nn.Module) -> list[str]:
    """Paths of the modules that hold parameters directly (Linear, norms, ...)."""
    return [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def linear_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
