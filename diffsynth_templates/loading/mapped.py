"""Safetensors weights used in place: written with a 64-byte-aligned data section, read as views of a
memory map (no copy), whose pages can be handed back to the page cache between uses.

A template store (``templates.residency``) keeps many templates "in host memory" this way: each file is
parsed once, its tensors stay views of the mapped file, and a template that is not in use holds no
resident pages (``MappedWeights.drop_pages``: the next use maps them again from the page cache, without
reading or copying). Only tensors at a 64-byte-aligned address are used in place (the CPU kernels round
unaligned data differently); the writer here orders tensors so that every one whose size is a
multiple of 64 bytes is aligned.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from .safetensors_io import _write_atomic

ALIGN = 64
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: back a range with pages in one call (not in every Python's mmap)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def prefault(tensor: Tensor) -> None:
    """Back a fresh, large CPU tensor's memory with pages now, in one call, instead of one page fault
    per 4 KiB as it is first written. Best effort: where the kernel lacks the call nothing happens;
    the contents are never touched. (Huge pages were slower here: direct compaction on the fault.)"""
    if _LIBC is None or tensor.device.type != "cpu" or tensor.nbytes < 1 << 22:
        return
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_POPULATE_WRITE)


def save_aligned_safetensors(
    tensors: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Write a standard safetensors file (atomically) whose data section starts at a multiple of 64
    bytes, tensors of 64-byte multiples first, so ``MappedWeights`` can use them in place."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    unknown = sorted({str(t.dtype) for t in tensors.values() if t.dtype not in _DTYPES})
    if unknown:
        raise ValueError(f"save_aligned_safetensors cannot write dtypes {unknown}")
    order = sorted(tensors, key=lambda k: (tensors[k].nbytes % ALIGN != 0, k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # spaces after the JSON are allowed by the format

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little"))
            f.write(text)
            for name in order:
                t = tensors[name]
                if t.nbytes:
                    f.write(t.reshape(-1).view(torch.uint8).numpy().data)

    _write_atomic(Path(path), write)


class MappedWeights:
    """A reader for ``load_module_from_files(reader=...)``: yields each file's tensors as views of a
    private (copy-on-write) memory map and keeps the maps, so their pages can be dropped and restored.

    Call it only on files whose header safetensors has validated (``read_header_keys`` does, first)."""

    def __init__(self) -> None:
        self.maps: list[mmap.mmap] = []

    def __call__(self, files: list[Path]) -> Iterator[tuple[str, Tensor]]:
        for path in files:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    continue
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.maps.append(
                mapped
            )  # pages map in as they are read (measured: faster than mapping all first)
            length = int.from_bytes(mapped[:8], "little")
            header = json.loads(bytes(mapped[8 : 8 + length]))
            header.pop("__metadata__", None)
            start = 8 + length
            for name, entry in header.items():
                begin, end = entry["data_offsets"]
                dtype = _TORCH_DTYPES.get(entry["dtype"])
                if dtype is None:  # a dtype this reader does not map: an ordinary copy
                    yield name, _copy(path, name)
                    continue
                count = (end - begin) // torch.empty((), dtype=dtype).element_size()
                flat = (
                    torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin)
                    if count
                    else torch.empty(0, dtype=dtype)
                )
                yield name, flat.view(entry["shape"])

    def drop_pages(self) -> None:
        """Hand the mapped pages back (resident memory falls; the data stays in the page cache and the
        next access maps it again). Only unmodified file pages are ever dropped: weights are read-only."""
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if advice is not None:
            for mapped in self.maps:
                mapped.madvise(advice)


def _copy(path: Path, name: str) -> Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).clone()
