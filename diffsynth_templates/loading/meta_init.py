"""Build modules on the meta device without running their initializers.

A module built on the meta device only gets its shapes there: the loader assigns the checkpoint's
tensors afterwards, so every initializer its constructors run is wasted. Worse, PyTorch's meta kernel
for ``normal_`` (used by ``nn.Embedding``, ``nn.init.normal_``, ``torch.randn``) is a Python reference
that imports ``torch._dynamo`` on first use: over a second, once per process, for nothing.

``meta_build()`` sets the meta default device (``torch.device("meta")``) and pushes a
``TorchFunctionMode`` on this thread's mode stack that returns the target tensor unchanged when an
in-place initializer (the ``torch.nn.init`` functions, the ``Tensor`` random and fill methods) is
called on a meta tensor. Anything else, and any initializer on a real tensor, runs as usual; the mode
is popped on exit, so modules built outside the context initialize normally.

``torch.device``'s own mode keeps itself at the bottom of the stack, so ours, entered after it, sits
above it: an initializer is seen (and skipped) by ours first, and a constructor such as
``torch.empty`` passes through ours unchanged to get ``device="meta"`` filled in below.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode, handle_torch_function, has_torch_function_unary


def scaled_normal_(tensor: Tensor, *, mul: float = 1.0, div: float = 1.0) -> Tensor:
    """Fill ``tensor`` in place exactly like ``torch.randn(tensor.shape) * mul / div`` (the same draws and
    roundings, bit for bit; ``normal_(std=mul / div)`` rounds differently). An initializer like
    ``nn.init.normal_``, so ``meta_build`` skips it on a meta tensor: in-place arithmetic on a meta tensor
    runs a Python meta kernel (``div_``'s imports sympy, a third of a second on first use)."""
    if has_torch_function_unary(tensor):
        return handle_torch_function(scaled_normal_, (tensor,), tensor, mul=mul, div=div)
    with torch.no_grad():
        tensor.normal_()
        if mul != 1.0:
            tensor.mul_(mul)
        if div != 1.0:
            tensor.div_(div)
    return tensor


# in-place initializers: they fill their first argument and return it (the nn.init ones that do not
# dispatch through handle_torch_function reach the mode as the Tensor methods below)
_INIT_FUNCTIONS = (
    nn.init.uniform_,
    nn.init.normal_,
    nn.init.trunc_normal_,
    nn.init.constant_,
    nn.init.ones_,
    nn.init.zeros_,
    nn.init.eye_,
    nn.init.dirac_,
    nn.init.xavier_uniform_,
    nn.init.xavier_normal_,
    nn.init.kaiming_uniform_,
    nn.init.kaiming_normal_,
    nn.init.orthogonal_,
    nn.init.sparse_,
    scaled_normal_,
)
_TENSOR_METHODS = (
    "normal_",
    "uniform_",
    "random_",
    "exponential_",
    "geometric_",
    "log_normal_",
    "cauchy_",
    "bernoulli_",
    "fill_",
    "zero_",
    "fill_diagonal_",
)
SKIPPED_ON_META = frozenset(_INIT_FUNCTIONS) | frozenset(getattr(Tensor, name) for name in _TENSOR_METHODS)


class SkipMetaInit(TorchFunctionMode):
    """Return the target unchanged for an in-place initializer called on a meta tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SKIPPED_ON_META:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


@contextmanager
def meta_build() -> Iterator[None]:
    """``with meta_build(): module = build()``: a module on the meta device, its initializers skipped."""
    with torch.device("meta"), SkipMetaInit():
        yield
