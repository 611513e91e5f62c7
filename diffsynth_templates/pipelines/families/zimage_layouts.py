"""Z-Image's native (official repository / ComfyUI) naming.

Facts from the reference: each attention's fused ``attention.qkv`` holds our q, k, v projections as
three equal blocks of output rows; ``attention.out`` is our ``attention.to_out.0`` and
``attention.q_norm/k_norm`` our ``norm_q/norm_k``; the patch embedder and the final layer of the one
released patch size are ``x_embedder`` / ``final_layer`` (ours: ``all_x_embedder.2-1``,
``all_final_layer.2-1``). Everything else has our names.
"""

from __future__ import annotations

import re

from .checkpoint_layout import CheckpointLayout, Slot

_QKV = {"to_q": 0, "to_k": 1, "to_v": 2}
_ATTN = re.compile(r"^(.+\.attention)\.(to_q|to_k|to_v|to_out\.0|norm_q|norm_k)$")
_RENAMED = {"to_out.0": "out", "norm_q": "q_norm", "norm_k": "k_norm"}
_PATCH = ("all_x_embedder.2-1", "all_final_layer.2-1")


def official_slot(name: str) -> Slot | None:
    match = _ATTN.match(name)
    if match:
        base, leaf = match.groups()
        if leaf in _QKV:
            return Slot(f"{base}.qkv", index=_QKV[leaf], chunks=3)
        return Slot(f"{base}.{_RENAMED[leaf]}")
    for ours, native in zip(_PATCH, ("x_embedder", "final_layer"), strict=True):
        if name == ours or name.startswith(ours + "."):
            return Slot(native + name[len(ours) :])
    if name.startswith(("all_x_embedder.", "all_final_layer.")):
        return None  # other patch sizes have no native name
    return Slot(name)


OFFICIAL = CheckpointLayout(
    name="official",
    title="Z-Image official / ComfyUI (layers.N.attention.qkv, attention.out, x_embedder)",
    prefixes=("model.diffusion_model.", "diffusion_model.", "transformer."),
    pattern=r"^(x_embedder|final_layer)\.|\.attention\.(qkv|out|q_norm|k_norm)\.",
    slot=official_slot,
    unused_keys=("norm_final.weight",),  # in the official files, read by no layer
)
