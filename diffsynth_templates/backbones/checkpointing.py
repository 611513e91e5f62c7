"""Gradient checkpointing of one DiT block, with runtime hooks that survive the recomputation.

Runtime LoRA branches are forward hooks that live only while their context is open (a training
step's forward). Non-reentrant checkpointing re-runs each block during backward, after that context
closed: without the branches the recomputed block saves other tensors and autograd refuses it. A
model's ``recompute_context`` (a factory of context managers, set by whoever opened such a context)
is therefore entered around every recomputation, so the block recomputes exactly what it computed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

RecomputeContext = Callable[[], AbstractContextManager[Any]]


def run_block(block: nn.Module, *args, enabled: bool, recompute_context: RecomputeContext | None = None):
    """``block(*args)``, checkpointed when ``enabled`` and gradients are on."""
    if not (enabled and torch.is_grad_enabled()):
        return block(*args)
    if recompute_context is None:
        return checkpoint(block, *args, use_reentrant=False)
    # called now, at forward time: the recomputation reopens the hooks active for *this* call
    return checkpoint(
        block, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), recompute_context())
    )
