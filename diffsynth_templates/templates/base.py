"""The Template model interface and its checker.

A template model turns task inputs into a template cache in two steps:

- ``process_inputs(pipe=None, **inputs)`` runs without gradients: preprocessing that never trains
  (encoding an image with the base VAE, measuring a value). Its result is what the trainer's stage I
  caches to disk.
- ``forward(pipe=None, **features)`` is the trainable path; it returns the cache, a dict whose keys
  are base-pipeline arguments (``kv_cache``, ``lora``, ``extra_text_embedding``, ...).

Optionally, a model that sets ``writes_kv_out = True`` is called, at inference with the output memo
off, with ``kv_out`` (``templates.stream_merge.KVOut``): ``kv_out.rows(block, 0 or 1, shape, dtype)``
is the memory that entry of its ``kv_cache`` will be merged into (or None); writing there and
returning those tensors saves the pipeline a copy of every token (``zoo/value_kv.py`` does).

Both accept ``**kwargs`` so a template ignores what it does not need. This matches DiffSynth-Studio's
``TemplateModel``, so models written for it work here unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import DiffSynthTemplatesError
from .schema import InputSchema


class TemplateError(DiffSynthTemplatesError, ValueError):
    """Base class of the template framework's errors; messages name the template involved."""


class TemplateInterfaceError(TemplateError):
    """A model does not implement the template interface."""


class TemplateModel(nn.Module):
    """Base class for template models (subclassing is optional: any module with the two methods works)."""

    #: the user inputs this template takes; None accepts anything
    input_schema: ClassVar[InputSchema | None] = None
    #: the cache keys this template emits (documentation and model cards)
    cache_keys: ClassVar[tuple[str, ...]] = ()
    #: forward() takes ``kv_out`` (a ``stream_merge.KVOut``, or absent): the memory its KV entries will
    #: be merged into, to write them there instead of into tensors the pipeline then copies
    writes_kv_out: ClassVar[bool] = False

    @torch.no_grad()
    def process_inputs(self, pipe: Any = None, **inputs: Any) -> dict[str, Any]:
        return dict(inputs)

    def forward(self, pipe: Any = None, **features: Any) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__}.forward must return the template cache")


def _accepts_var_kwargs(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def check_template_model(model: Any, name: str = "template") -> None:
    """Raise ``TemplateInterfaceError`` listing everything ``model`` lacks to be a template model."""
    problems = []
    for method in ("process_inputs", "forward"):
        fn = getattr(model, method, None)
        if fn is None or not callable(fn):
            problems.append(f"it has no {method}() method")
        elif not _accepts_var_kwargs(fn):
            problems.append(f"{method}() must accept **kwargs (it is called with pipe=... and every input)")
    if problems:
        raise TemplateInterfaceError(
            f"{name} ({type(model).__name__}) is not a template model: " + "; ".join(problems)
            + ". Implement process_inputs(self, pipe=None, **inputs) and forward(self, pipe=None, **features)."
        )  # fmt: skip
