"""The pipelines' low-memory modes: compact weight storage and block-level offload under a limit.

``LowMemoryMixin`` is mixed into ``FamilyPipeline``; it needs ``dit``, ``text_encoder``, ``vae``,
``device``, ``torch_dtype`` and ``offload_device`` (``PipelineBase``'s contract).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from ..loading.quantize import (
    FP8Linear,
    QuantizationError,
    StorageReport,
    cast_unquantized,
    storage_format,
    store_weights,
)
from .offload import BlockOffload, GiB, OffloadError

logger = logging.getLogger(__name__)

CASTABLE = ("dit", "text_encoder")  # the VAE's convolutions are small and precision-bound: not cast


def check_compute_dtype(compute_dtype: object) -> torch.dtype:
    if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point) or (
        compute_dtype.itemsize < 2
    ):
        raise QuantizationError(
            f"compute_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {compute_dtype!r}"
        )
    return compute_dtype


def check_vram_limit(vram_limit_gb: object) -> float:
    if (
        isinstance(vram_limit_gb, bool)
        or not isinstance(vram_limit_gb, numbers.Real)
        or not vram_limit_gb > 0
    ):
        raise OffloadError(f"vram_limit_gb must be a number of GiB > 0, got {vram_limit_gb!r}")
    return float(vram_limit_gb)


def load_stored(load: Callable[[torch.device | str], nn.Module], device, weight_dtype=None) -> nn.Module:
    """``load(device)``; with ``weight_dtype``, ``load("cpu")``, its large Linears stored in that format
    on the host, then moved: the device never holds the wide copy."""
    if weight_dtype is None:
        return load(device)
    fmt = storage_format(weight_dtype)  # refused before anything is read
    module = load("cpu")
    store_weights(module, fmt)
    return module.to(device)


class LowMemoryMixin:
    _block_offload: BlockOffload | None = None
    storage_reports: dict[str, StorageReport] = {}

    def enable_layerwise_casting(
        self,
        storage_dtype: torch.dtype | str = "float8_e4m3fn",
        compute_dtype: torch.dtype | None = None,
        components: Sequence[str] = CASTABLE,
        per_channel: bool = True,
    ):
        """Store the large Linear weights of ``components`` in ``storage_dtype`` (FP8 with a scale per
        output channel, or ``"int8"``/``"nf4"`` through torchao) and compute in ``compute_dtype``
        (default: the pipeline's dtype). Runtime LoRA branches and template KV work as before."""
        if self._block_offload is not None:
            raise OffloadError(
                "call enable_layerwise_casting before enable_block_offload (it plans by bytes)"
            )
        compute = check_compute_dtype(compute_dtype or self.torch_dtype)
        unknown = [c for c in components if c not in CASTABLE]
        if unknown:
            raise QuantizationError(f"components {unknown} cannot be cast; choose among {list(CASTABLE)}")
        reports = dict(self.storage_reports)
        for name in components:
            reports[name] = store_weights(getattr(self, name), storage_dtype, per_channel=per_channel)
        for module in (self.dit, self.text_encoder, self.vae):  # one compute dtype for the whole call
            cast_unquantized(module, self.torch_dtype, compute)
        self.storage_reports = reports
        self.torch_dtype = compute
        return self

    def enable_block_offload(
        self,
        vram_limit_gb: float,
        prefetch: int = 1,
        device: str | torch.device | None = None,
        blocks_per_group: int = 1,
    ):
        """Keep at most ``vram_limit_gb`` GiB of DiT weights on ``device`` (default: the pipeline's):
        the blocks that do not fit stream from pinned host memory, ``prefetch`` groups ahead on a side
        CUDA stream; the text encoder and VAE wait in host memory and move to the device for their
        phase. Template KV and LoRA branches stay on the device. Images are bit-identical."""
        limit = check_vram_limit(vram_limit_gb)
        device = torch.device(device) if device is not None else self.device
        self.disable_block_offload()
        self._block_offload = BlockOffload(self.dit, device, round(limit * GiB), prefetch, blocks_per_group)
        for module in (self.text_encoder, self.vae):
            module.to("cpu")
        self.offload_device = self.device = device
        return self

    def disable_block_offload(self):
        """Every DiT weight back on the device (what ``enable_block_offload`` started from)."""
        if self._block_offload is None:
            return self
        self._block_offload.remove()
        self._block_offload = None
        for module in (self.dit, self.text_encoder, self.vae):
            module.to(self.device)
        self.offload_device = None
        return self

    def fuse_lora(self, *args, **kwargs):
        """Refused on FP8-stored or streamed layers (it would write into them); else as without."""
        self._check_weights_writable("fuse_lora")
        return super().fuse_lora(*args, **kwargs)

    def unfuse_lora(self, *args, **kwargs):
        self._check_weights_writable("unfuse_lora")
        return super().unfuse_lora(*args, **kwargs)

    def _check_weights_writable(self, what: str) -> None:
        if self._block_offload is not None:
            raise OffloadError(f"{what} before enable_block_offload: streamed weights are not on hand")
        if any(isinstance(m, FP8Linear) for m in self.dit.modules()):
            raise QuantizationError(
                f"{what} cannot write into FP8-stored weights: keep LoRAs as runtime branches (the "
                "default, exact on FP8 layers), or fuse/unfuse before enable_layerwise_casting"
            )

    @property
    def block_offload(self) -> BlockOffload | None:
        """The active block offload (its ``plan``, ``max_loaded``, ``loads``), or None."""
        return self._block_offload

    @contextlib.contextmanager
    def _on_device(self, module: nn.Module) -> Iterator[nn.Module]:
        if self._block_offload is not None and module is self.dit:
            try:
                yield module  # resident part on the device already; the blocks stream themselves
            finally:  # the denoising phase is over: the VAE's phase gets the streamed groups' room
                self._block_offload.release_all()
            return
        with super()._on_device(module):
            yield module
