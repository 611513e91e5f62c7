"""LoRA files loaded into a pipeline: ``load_lora`` / ``unload_lora`` / ``set_lora_scale`` /
``fuse_lora`` / ``unfuse_lora``, one implementation for every family's pipeline.

A loaded LoRA is a runtime low-rank branch like a template's (``lora.applied_lora``), entered once per
call around the denoising loop, so it composes with template LoRAs and with other loaded LoRAs by
adding deltas. ``fuse_lora`` writes ``scale * B @ A`` into the base weights (faster steps); the
weights it replaced are kept, so ``unfuse_lora`` restores them bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .common import check_finite_cache
from .lora import LoRAError, applied_lora, split_lora, validate_lora
from .lora_files import convert_lora, read_lora_file, resolve_lora_source, save_lora_file

logger = logging.getLogger(__name__)


@dataclass
class LoadedLoRA:
    lora: dict[str, Tensor]  # our LoRA cache
    scale: float
    source: str
    fused: bool = False


def _check_scale(scale: object, name: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoRAError(f"the scale of LoRA {name!r} must be a finite number, got {scale!r}")
    return float(scale)


class LoRAAdaptersMixin:
    """Needs ``self.dit`` and ``self.family``."""

    @property
    def lora_adapters(self) -> dict[str, LoadedLoRA]:
        """The loaded LoRAs by adapter name, in load order."""
        return self.__dict__.setdefault("_lora_adapters", {})

    def load_lora(
        self,
        path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
        scale: float = 1.0,
        adapter_name: str | None = None,
    ) -> str:
        """Load a LoRA file (local, or ``owner/name/file.safetensors`` on ModelScope) or state dict in
        the BFL / ComfyUI / ai-toolkit, kohya or diffusers / PEFT layout; returns its adapter name."""
        if isinstance(path_or_state_dict, Mapping):
            source, state = "the LoRA state dict", path_or_state_dict
            default_name = f"lora_{len(self.lora_adapters)}"
        else:
            path = resolve_lora_source(path_or_state_dict)
            source, state, default_name = f"LoRA file {str(path)!r}", read_lora_file(path), Path(path).stem
        name = adapter_name or default_name
        if name in self.lora_adapters:
            raise LoRAError(f"a LoRA named {name!r} is loaded already; pass another adapter_name")
        scale = _check_scale(scale, name)
        lora = convert_lora(state, self.family, self.dit, source)
        validate_lora(self.dit, lora, source)
        check_finite_cache(lora, source)
        self.lora_adapters[name] = LoadedLoRA(lora, scale, source)
        logger.info("loaded %s as %r (%d modules, scale %g)", source, name, len(split_lora(lora)), scale)
        return name

    def _adapter(self, name: str) -> LoadedLoRA:
        if name not in self.lora_adapters:
            raise LoRAError(f"no LoRA named {name!r} is loaded; loaded: {list(self.lora_adapters)}")
        return self.lora_adapters[name]

    def unload_lora(self, adapter_name: str | None = None) -> None:
        """Remove one loaded LoRA (``None``: all). A fused LoRA must be unfused first."""
        names = list(self.lora_adapters) if adapter_name is None else [adapter_name]
        fused = [n for n in names if self._adapter(n).fused]
        if fused:
            raise LoRAError(f"LoRAs {fused} are fused into the weights: call unfuse_lora() before unloading")
        for n in names:
            del self.lora_adapters[n]

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        adapter = self._adapter(adapter_name)
        if adapter.fused:
            raise LoRAError(f"LoRA {adapter_name!r} is fused: call unfuse_lora() before changing its scale")
        adapter.scale = _check_scale(scale, adapter_name)

    @torch.no_grad()
    def fuse_lora(self, adapter_names: list[str] | None = None) -> None:
        """Add ``scale * B @ A`` of the named (default: all) unfused LoRAs into the DiT's weights."""
        originals = self.__dict__.setdefault("_lora_originals", {})
        modules = dict(self.dit.named_modules())
        for name in list(self.lora_adapters) if adapter_names is None else adapter_names:
            adapter = self._adapter(name)
            if adapter.fused:
                continue
            for module, (a, b) in split_lora(adapter.lora).items():
                weight = modules[module].weight
                originals.setdefault(module, weight.detach().clone())
                delta = adapter.scale * (
                    b.to(weight.device, torch.float32) @ a.to(weight.device, torch.float32)
                )
                weight.copy_((weight.float() + delta).to(weight.dtype))
            adapter.fused = True

    @torch.no_grad()
    def unfuse_lora(self) -> None:
        """Restore every weight ``fuse_lora`` changed, bit for bit."""
        modules = dict(self.dit.named_modules())
        for module, original in self.__dict__.pop("_lora_originals", {}).items():
            modules[module].weight.copy_(original)
        for adapter in self.lora_adapters.values():
            adapter.fused = False

    def save_lora(
        self, lora: Mapping[str, Tensor] | str, path: str | os.PathLike, fmt: str = "comfyui"
    ) -> Path:
        """Write a LoRA cache (a template's ``lora`` output, a trained ``dit_lora``) or a loaded
        adapter (by name, its scale folded in) as a file ComfyUI (``"comfyui"``) or diffusers
        (``"diffusers"``) loads."""
        if isinstance(lora, str):
            adapter = self._adapter(lora)
            lora = {k: v * adapter.scale if ".lora_B." in k else v for k, v in adapter.lora.items()}
        return save_lora_file(lora, path, self.family, fmt)

    @contextlib.contextmanager
    def loaded_loras_applied(self) -> Iterator[None]:
        """The unfused, non-zero loaded LoRAs as runtime branches on the DiT, for one call."""
        with contextlib.ExitStack() as stack:
            for adapter in self.lora_adapters.values():
                if not adapter.fused and adapter.scale != 0:
                    stack.enter_context(applied_lora(self.dit, adapter.lora, adapter.scale, adapter.source))
            yield
