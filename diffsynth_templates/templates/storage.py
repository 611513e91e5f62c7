"""Compact weight storage for template models (``loading.quantize``), as for the DiT and text encoder."""

from __future__ import annotations

import torch
from torch import nn

from ..loading.quantize import StorageReport, store_weights


def store_template_weights(template_pipe, storage: str | torch.dtype) -> dict[str, StorageReport]:
    """Store the large Linear weights of every template of ``template_pipe`` in ``storage`` (e.g.
    ``torch.float8_e4m3fn``); they compute in the template pipeline's dtype. The loaded templates are
    the host store's own objects, so the change holds for every pipeline sharing that store (and a
    template the store drops and re-reads comes back in its checkpoint's dtype)."""
    reports = {}
    for slot in template_pipe.slots:
        loaded = template_pipe.store.get(
            slot.folder, template_pipe.torch_dtype, template_pipe.trust_remote_code
        )
        if isinstance(loaded.model, nn.Module):
            reports[slot.name] = store_weights(loaded.model, storage)
    return reports
