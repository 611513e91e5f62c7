"""Build a module on the meta device and fill it straight from safetensors.

The module is created without allocating memory, then each checkpoint tensor is read, cast to the
target dtype and moved to the target device one at a time and assigned in place, so peak host
memory is about one copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .finite import NonFiniteError, nonfinite_names
from .meta_init import meta_build
from .safetensors_io import CheckpointError, find_weight_files, iter_tensors, read_header_keys

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)


def read_config(folder: str | os.PathLike, name: str = "config.json") -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found: a component folder needs its {name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from e
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)!r}: {e.strerror or e}") from e


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_module_from_files(
    build: Callable[[], M],
    files: list[Path],
    *,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    key_map: Callable[[str], str | None] | None = None,
    ignore_keys: Callable[[str], bool] | None = None,
    keep_fp32: Callable[[str], bool] | None = None,
    reader: Callable[[list[Path]], Iterable[tuple[str, torch.Tensor]]] | None = None,
) -> M:
    """Create ``build()`` on the meta device (``meta_build``: its initializers skipped) and load ``files`` into it.

    ``key_map`` renames checkpoint keys (return None to drop one); ``ignore_keys`` marks checkpoint
    keys that may be present without a matching parameter (e.g. an unused ``lm_head``);
    ``keep_fp32`` names parameters kept in float32 whatever ``torch_dtype`` is; ``reader`` yields the
    files' tensors instead of ``iter_tensors`` (``loading.mapped.MappedWeights``: views, no copy).
    Missing, unexpected or mis-shaped keys raise ``CheckpointError`` listing all of them; weights that
    hold NaN or inf (as stored, or after the cast to ``torch_dtype``) raise ``NonFiniteError`` naming them
    and their file.
    """
    with meta_build():
        model = build()
    expected = dict(model.state_dict(keep_vars=True))
    header = read_header_keys(files)

    mapped: dict[str, str] = {}
    unexpected = []
    for ckpt_key in header:
        name = key_map(ckpt_key) if key_map else ckpt_key
        if name is None or (ignore_keys and ignore_keys(ckpt_key)):
            continue
        if name not in expected:
            unexpected.append(ckpt_key)
        else:
            mapped[ckpt_key] = name
    missing = set(expected) - set(mapped.values())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise CheckpointError(
            f"checkpoint {[str(f) for f in files]} does not match {type(model).__name__}: " + "; ".join(parts)
        )

    loaded: dict[str, torch.Tensor] = {}
    bad_shapes: list[str] = []
    nonfinite: list[str] = []  # checked once per tensor as it arrives: no second pass over the model
    for ckpt_key, tensor in (reader or iter_tensors)(files):
        name = mapped.get(ckpt_key)
        if name is None:
            continue
        want = expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            bad_shapes.append(f"{ckpt_key}: checkpoint {tuple(tensor.shape)} vs model {tuple(want.shape)}")
            continue
        dtype = want.dtype if not tensor.is_floating_point() else torch_dtype or tensor.dtype
        if keep_fp32 and keep_fp32(name):
            dtype = torch.float32
        loaded[name] = tensor.to(device=device, dtype=dtype)
        nonfinite += nonfinite_names([(f"{ckpt_key} ({header[ckpt_key].name})", loaded[name])])
    if bad_shapes:
        raise CheckpointError(
            f"checkpoint {[str(f) for f in files]} has mis-shaped tensors for {type(model).__name__}: "
            + "; ".join(bad_shapes[:20])
        )
    if nonfinite:
        more = f" and {len(nonfinite) - 5} more" if len(nonfinite) > 5 else ""
        folders = sorted({str(f.parent) for f in files})
        cast = f", or out of range for {torch_dtype}" if torch_dtype else ""
        raise NonFiniteError(
            f"weights in {folders} hold NaN or inf values (as stored{cast}): {nonfinite[:5]}{more}; "
            "the checkpoint is damaged or its training diverged: use another checkpoint"
        )
    # one assignment at the end: each load_state_dict call walks the whole module tree, and holding
    # the tensors until then costs nothing (they end up in the model either way)
    model.load_state_dict(loaded, strict=False, assign=True)
    _materialize_buffers(model, device, torch_dtype)
    return model


def _materialize_buffers(model: nn.Module, device, torch_dtype) -> None:
    """Non-persistent buffers (e.g. RoPE tables) are not in the checkpoint: rebuild them for real.
    (Parameters and persistent buffers were all assigned: the key check before refuses any missing.)"""
    if not any(b.is_meta for b in model.buffers()):
        return
    for module in model.modules():
        if hasattr(module, "reset_buffers") and any(b.is_meta for b in module.buffers(recurse=False)):
            module.reset_buffers(device=device)
    leftovers = [n for n, t in model.state_dict().items() if t.is_meta]
    leftovers += [n for n, b in model.named_buffers() if b.is_meta]
    if leftovers:
        raise CheckpointError(
            f"{type(model).__name__} still has uninitialized tensors after loading: {leftovers}"
        )


def load_component(
    build: Callable[[], M],
    folder: str | os.PathLike,
    *,
    stem: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    **kwargs,
) -> M:
    files = find_weight_files(folder, stem)
    logger.info("loading %s from %d file(s) in %s", getattr(build, "__name__", "model"), len(files), folder)
    model = load_module_from_files(build, files, torch_dtype=torch_dtype, device=device, **kwargs)
    return model.eval().requires_grad_(False)


def save_component(
    model: nn.Module, folder: str | os.PathLike, config: dict, stem: str = "diffusion_pytorch_model"
) -> Path:
    """Write ``config.json`` + ``{stem}.safetensors`` in the official layout, each file atomically."""
    from .safetensors_io import save_safetensors_atomic, write_json_atomic

    folder = Path(folder)
    save_safetensors_atomic(model.state_dict(), folder / f"{stem}.safetensors")
    write_json_atomic(config, folder / "config.json")
    return folder


P = TypeVar("P", bound="PretrainedModule")


class PretrainedModule:
    """``from_pretrained`` / ``save_pretrained`` in the official layout, for an ``nn.Module`` built from a
    config dataclass: one implementation for every backbone (DiTs, VAEs, the text encoder).

    A subclass names its ``config_class`` and how that config reads and writes the folder's
    ``config.json`` (``config_format``: ``"dict"`` for ``from_dict``/``to_dict``, ``"diffusers"`` for
    ``from_diffusers``/``to_diffusers``), its weights' file stem (``None``: any known stem on load,
    ``diffusion_pytorch_model`` on save) and extra ``load_component`` options.
    """

    config_class: ClassVar[type]
    config_format: ClassVar[str] = "dict"
    weights_stem: ClassVar[str | None] = None
    load_options: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_pretrained(
        cls: type[P],
        folder: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
    ) -> P:
        """Load an official-layout component folder (``config.json`` + safetensors, sharded or not)."""
        config = getattr(cls.config_class, f"from_{cls.config_format}")(read_config(folder))

        def build() -> P:
            return cls(config)

        build.__name__ = cls.__name__
        return load_component(
            build, folder, stem=cls.weights_stem, torch_dtype=torch_dtype, device=device, **cls.load_options
        )

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``{stem}.safetensors`` in the official layout."""
        config = getattr(self.config, f"to_{self.config_format}")()
        save_component(self, folder, config, stem=self.weights_stem or "diffusion_pytorch_model")


def load_module_from_state_dict(
    build: Callable[[], M],
    state: dict[str, torch.Tensor],
    *,
    source: str,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> M:
    """``load_module_from_files`` for tensors already in memory under the module's own names (a
    converted single-file checkpoint): the same key, shape and finite checks, then frozen in eval mode."""
    with meta_build():
        model = build()
    expected = dict(model.state_dict(keep_vars=True))
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        parts = [f"missing keys: {_format_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {_format_keys(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{source} does not match {type(model).__name__}: " + "; ".join(parts))
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise CheckpointError(
            f"{source} has mis-shaped tensors for {type(model).__name__}: " + "; ".join(bad[:20])
        )
    loaded = {
        k: v.to(device=device, dtype=torch_dtype or v.dtype if v.is_floating_point() else expected[k].dtype)
        for k, v in state.items()
    }
    nonfinite = nonfinite_names(loaded)
    if nonfinite:
        raise NonFiniteError(
            f"weights in {source} hold NaN or inf values: {nonfinite[:5]}; use another checkpoint"
        )
    model.load_state_dict(loaded, strict=True, assign=True)
    _materialize_buffers(model, device, torch_dtype)
    return model.eval().requires_grad_(False)
