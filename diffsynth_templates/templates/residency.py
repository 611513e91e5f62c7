"""Where templates live: a process-wide host store, a bounded set on the accelerator, and an output memo.

- ``HostStore``: each template folder is read from disk (code executed, weights loaded) at most once
  per process and kept in host memory; with a host capacity, least-recently-used templates are
  dropped and re-read from disk when needed again. The weights are views of their files' memory maps
  (``loading/mapped.py``: parsed once, never copied), so a template not in use holds no resident
  pages: they stay in the page cache and map back on the next use.
- ``ResidencyScheduler``: at most ``max_resident`` templates on the accelerator; one more needed
  evicts the least recently used back to the host. On a GPU the host copies are pinned once and
  moved with non-blocking copies; moving back re-points the weights at the host copies (weights are
  read-only at inference: nothing is copied back). On the CPU nothing moves: an evicted template's
  mapped pages are handed back. Its ``stats`` are the accounting tests check.
- ``OutputMemo``: caches of identical inputs are reused across calls (keyed by the template and a
  hash of its inputs), with a size bound.
- ``stage_threads``: the CPU intra-op thread count while the stage runs (its ops are many small,
  memory-bound copies, sums and adds: more threads buy nothing and, on a busy machine, each op waits
  for a descheduled worker thread at its barrier).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .base import TemplateError
from .folder import LoadedTemplate, load_template_folder

logger = logging.getLogger(__name__)


class HostStore:
    """Loaded templates in host memory, keyed by (folder, dtype, trust)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self._items: OrderedDict[tuple, LoadedTemplate] = OrderedDict()
        self.disk_loads: Counter[str] = Counter()

    def get(self, folder: Path, torch_dtype, trust_remote_code: bool) -> LoadedTemplate:
        key = (str(folder.resolve()), str(torch_dtype), trust_remote_code)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        loaded = load_template_folder(
            folder,
            torch_dtype=torch_dtype,
            device="cpu",
            trust_remote_code=trust_remote_code,
            map_weights=True,
        )
        self.disk_loads[key[0]] += 1
        self._items[key] = loaded
        while self.capacity is not None and len(self._items) > self.capacity:
            dropped, _ = self._items.popitem(last=False)
            logger.info("host store full: dropped %s (it will be re-read from disk when needed)", dropped[0])
        return loaded

    def clear(self) -> None:
        self._items.clear()


#: the store shared by every TemplatePipeline of this process
HOST_STORE = HostStore()


@dataclass
class ResidencyStats:
    to_device: Counter[str] = field(default_factory=Counter)
    to_host: Counter[str] = field(default_factory=Counter)
    max_resident: int = 0
    residency_log: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def reset(self) -> None:
        self.to_device.clear()
        self.to_host.clear()
        self.max_resident = 0
        self.residency_log.clear()


class ResidencyScheduler:
    """Keeps at most ``max_resident`` templates on ``device`` (None: no bound, nothing moves off)."""

    def __init__(self, device: torch.device, max_resident: int | None = None):
        if max_resident is not None and max_resident < 1:
            raise TemplateError(f"max_resident must be >= 1 (or None for no bound), got {max_resident}")
        self.device = device
        self.max_resident = max_resident
        self.resident: OrderedDict[str, LoadedTemplate] = OrderedDict()
        self.stats = ResidencyStats()

    def acquire(self, key: str, template: LoadedTemplate) -> LoadedTemplate:
        if key in self.resident:
            self.resident.move_to_end(key)
            return template
        while self.max_resident is not None and len(self.resident) >= self.max_resident:
            old_key, old = self.resident.popitem(last=False)
            _to_host(old)
            self.stats.to_host[old_key] += 1
            self.stats.residency_log.append(("off", tuple(self.resident)))
        _to_device(template, self.device)
        self.resident[key] = template
        self.stats.to_device[key] += 1
        self.stats.max_resident = max(self.stats.max_resident, len(self.resident))
        self.stats.residency_log.append(("on", tuple(self.resident)))
        return template

    def release_all(self) -> None:
        """Move every resident template back to the host (lazy mode ends each call this way)."""
        for key, template in list(self.resident.items()):
            _to_host(template)
            self.stats.to_host[key] += 1
        self.resident.clear()
        self.stats.residency_log.append(("off", ()))


def _to_device(template: LoadedTemplate, device: torch.device) -> None:
    model = template.model
    if not isinstance(model, nn.Module):
        return
    if _is_on(model, device):  # the CPU: the host copy is the working copy; handed-back pages of its
        return  # mapped weights come back as they are read (measured: faster than mapping all at once)
    if device.type == "cuda" and template.host_state is None:  # pinned once: later copies are async
        template.host_state = {k: v.pin_memory() for k, v in model.state_dict().items()}
        model.load_state_dict(template.host_state, assign=True)
        if template.mapped is not None:  # the pinned copies replaced the mapped views
            template.mapped.drop_pages()
            template.mapped = None
    model.to(device, non_blocking=True)


def _to_host(template: LoadedTemplate) -> None:
    model = template.model
    if not isinstance(model, nn.Module):
        return
    if not _is_on(model, torch.device("cpu")):
        if template.host_state is not None:  # back to the host copies: no device-to-host copy
            model.load_state_dict(template.host_state, assign=True)
        model.to("cpu")
    if template.mapped is not None:
        template.mapped.drop_pages()


def _is_on(model: nn.Module, device: torch.device) -> bool:
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    if first is None:
        return True
    here = first.device
    return here.type == device.type and (device.index is None or here.index in (None, device.index))


def hash_inputs(value: Any) -> str:
    """A content hash of template inputs: tensors, arrays and images by their bytes, the rest by repr."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h, value: Any) -> None:
    if isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(repr(k).encode())
            _feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[" if isinstance(value, list) else b"(")
        for v in value:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        h.update(f"A{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Image.Image):
        h.update(f"I{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


class OutputMemo:
    """LRU map from (template, input hash) to the cache it produced."""

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self._items: OrderedDict[tuple, dict] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> dict | None:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: tuple, cache: dict) -> None:
        if self.max_entries <= 0:
            return
        self._items[key] = cache
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


#: intra-op threads of the template stage on the CPU (``TemplatePipeline(stage_threads=...)``)
STAGE_THREADS = 1


@contextmanager
def stage_threads(device: torch.device, threads: int | None) -> Iterator[None]:
    """At most ``threads`` CPU intra-op threads inside (None, or a template stage off the CPU:
    unchanged); the process's setting is restored after. Results do not depend on it: the stage's
    ops split their output, never a reduction's order, across threads (tested bit-identical)."""
    before = torch.get_num_threads()
    if threads is None or device.type != "cpu" or before <= threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
