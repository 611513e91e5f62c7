"""FLUX.2's native (BFL) naming, as the official single files, ComfyUI and ai-toolkit LoRAs use it.

Facts from the reference: the double blocks' fused ``img_attn.qkv`` / ``txt_attn.qkv`` hold our
q, k, v projections as three equal blocks of output rows; ``img_mlp.0/2`` and ``txt_mlp.0/2`` are the
streams' MLPs; ``single_blocks.N.linear1/linear2`` are the fused QKV+MLP input and the output
projection; RMSNorm weights are called ``scale``; the output head's AdaLN rows are (shift, scale).
"""

from __future__ import annotations

import re

from ...backbones.flux2_dit import Flux2DiTConfig
from .checkpoint_layout import CheckpointLayout, Slot

_NORM = (("weight", "scale"),)
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def bfl_slot(name: str) -> Slot | None:
    if name in _GLOBAL:
        return Slot(_GLOBAL[name])
    if name == "norm_out.linear":
        return Slot("final_layer.adaLN_modulation.1", swap_halves=True)
    match = _BLOCK.match(name)
    if match is None:
        return None
    kind, i, rest = match.groups()
    if kind == "single_transformer_blocks":
        if rest in _SINGLE:
            return Slot(f"single_blocks.{i}.{_SINGLE[rest]}")
        return (
            Slot(f"single_blocks.{i}.{_SINGLE_NORMS[rest]}", params=_NORM) if rest in _SINGLE_NORMS else None
        )
    proj = rest.removeprefix("attn.")
    if proj in _QKV:
        stream = "txt" if proj.startswith("add_") else "img"
        return Slot(f"double_blocks.{i}.{stream}_attn.qkv", index=_QKV[proj], chunks=3)
    if rest in _DOUBLE:
        return Slot(f"double_blocks.{i}.{_DOUBLE[rest]}")
    return Slot(f"double_blocks.{i}.{_DOUBLE_NORMS[rest]}", params=_NORM) if rest in _DOUBLE_NORMS else None


def infer_config(shapes: dict[str, tuple[int, ...]]) -> Flux2DiTConfig:
    """A klein config from a BFL file's shapes; the RoPE axes split the head evenly in four (klein's
    128 = 4 x 32), rope theta and eps are klein's."""

    def count(prefix: str) -> int:
        return len({k.split(".")[1] for k in shapes if k.startswith(prefix)})

    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return Flux2DiTConfig(
        in_channels=in_channels,
        out_channels=shapes["final_layer.linear.weight"][0],
        num_double_blocks=count("double_blocks."),
        num_single_blocks=count("single_blocks."),
        num_heads=hidden // head_dim,
        head_dim=head_dim,
        text_dim=shapes["txt_in.weight"][1],
        mlp_ratio=shapes["double_blocks.0.img_mlp.0.weight"][0] / 2 / hidden,
        axes_dims_rope=(head_dim // 4,) * 4,
        timestep_channels=shapes["time_in.in_layer.weight"][1],
        guidance_embeds="guidance_in.in_layer.weight" in shapes,
    )


BFL = CheckpointLayout(
    name="bfl",
    title="BFL / ComfyUI / ai-toolkit (double_blocks.N.img_attn.qkv, single_blocks.N.linear1)",
    prefixes=("model.diffusion_model.", "diffusion_model.", "transformer."),
    pattern=r"^(double_blocks|single_blocks|img_in|txt_in|time_in|guidance_in|final_layer)\.|_modulation\w*\.lin\b",
    slot=bfl_slot,
    infer_config=infer_config,
)
