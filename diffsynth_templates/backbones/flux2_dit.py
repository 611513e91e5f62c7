"""The FLUX.2 diffusion transformer (klein 4B / 9B and the same code at any size) with native KV-cache attention.

Layout: text and image tokens are embedded, pass ``num_double_blocks`` double-stream blocks (separate
weights per stream, joint attention) and ``num_single_blocks`` single-stream blocks (one fused
QKV+MLP projection over the joined sequence), then an AdaLN output head on the image tokens.
AdaLN modulation is computed once per call and shared by all blocks. Parameter names follow the
official diffusers ``transformer/`` checkpoints so they load without renaming.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loading.model_loading import PretrainedModule
from .attention import (
    KVBlockSpec,
    KVCache,
    apply_rope,
    attention,
    check_rope_axes,
    rope_cos_sin,
    validate_kv_cache,
)
from .checkpointing import RecomputeContext, run_block


@dataclass
class Flux2DiTConfig:
    in_channels: int = 128
    out_channels: int | None = None
    num_double_blocks: int = 5
    num_single_blocks: int = 20
    num_heads: int = 24
    head_dim: int = 128
    text_dim: int = 7680
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    timestep_channels: int = 256
    eps: float = 1e-6
    guidance_embeds: bool = False
    patch_size: int = 1
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for round trips

    def __post_init__(self) -> None:
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("in_channels", "num_heads", "head_dim", "text_dim", "timestep_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Flux2DiTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_double_blocks < 0 or self.num_single_blocks < 0:
            raise ValueError("Flux2DiTConfig block counts must be >= 0")
        check_rope_axes(self.axes_dims_rope, self.head_dim, "Flux2DiTConfig.axes_dims_rope")
        if self.patch_size != 1:
            raise ValueError(
                f"patch_size {self.patch_size} is not supported: FLUX.2 patchifies in the VAE (use 1)"
            )

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    # diffusers config.json names <-> ours
    _DIFFUSERS_NAMES = {
        "num_layers": "num_double_blocks",
        "num_single_layers": "num_single_blocks",
        "num_attention_heads": "num_heads",
        "attention_head_dim": "head_dim",
        "joint_attention_dim": "text_dim",
        "timestep_guidance_channels": "timestep_channels",
    }

    @classmethod
    def from_diffusers(cls, config: dict) -> Flux2DiTConfig:
        ours = {f.name for f in fields(cls)}
        kwargs, extra = {}, {}
        for key, value in config.items():
            name = cls._DIFFUSERS_NAMES.get(key, key)
            if name in ours and name != "extra":
                kwargs[name] = value
            else:
                extra[key] = value
        return cls(**kwargs, extra=extra)

    def to_diffusers(self) -> dict:
        back = {v: k for k, v in self._DIFFUSERS_NAMES.items()}
        d = {back.get(k, k): v for k, v in asdict(self).items() if k != "extra"}
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        d["_class_name"] = "Flux2Transformer2DModel"
        return {**self.extra, **d}

    @classmethod
    def klein_4b(cls) -> Flux2DiTConfig:
        return cls(num_double_blocks=5, num_single_blocks=20, num_heads=24, head_dim=128, text_dim=7680)

    @classmethod
    def klein_9b(cls) -> Flux2DiTConfig:
        return cls(num_double_blocks=8, num_single_blocks=24, num_heads=32, head_dim=128, text_dim=12288)


# --- small building blocks -----------------------------------------------------------------------


def timestep_embedding(t: Tensor, channels: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, cosine half first (the reference's flip_sin_to_cos=True)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim, bias=False)
        self.linear_2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    def __init__(self, cfg: Flux2DiTConfig):
        super().__init__()
        self.channels = cfg.timestep_channels
        self.timestep_embedder = MLPEmbedder(cfg.timestep_channels, cfg.hidden_size)
        self.guidance_embedder = (
            MLPEmbedder(cfg.timestep_channels, cfg.hidden_size) if cfg.guidance_embeds else None
        )

    def forward(self, timestep: Tensor, guidance: Tensor | None) -> Tensor:
        emb = self.timestep_embedder(timestep_embedding(timestep, self.channels).to(timestep.dtype))
        if guidance is not None and self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, self.channels).to(guidance.dtype))
        return emb


class Modulation(nn.Module):
    """SiLU + Linear producing ``sets`` triples of (shift, scale, gate), each ``[B, 1, dim]``."""

    def __init__(self, dim: int, sets: int):
        super().__init__()
        self.sets = sets
        self.linear = nn.Linear(dim, dim * 3 * sets, bias=False)

    def forward(self, temb: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        chunks = self.linear(F.silu(temb)).unsqueeze(1).chunk(3 * self.sets, dim=-1)
        return [tuple(chunks[3 * i : 3 * i + 3]) for i in range(self.sets)]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * x + shift


def swiglu(x: Tensor) -> Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_out(swiglu(self.linear_in(x)))


def _layer_norm(x: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps)


class KVTail:
    """Keeps the last ``tokens`` keys and values (after QK-norm and RoPE: what attention sees) of each
    block a forward runs, in block order; only that slice is kept, never a whole sequence's."""

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.entries: list[tuple[Tensor, Tensor]] = []

    def __call__(self, k: Tensor, v: Tensor) -> None:
        tail = slice(k.shape[1] - self.tokens, None)
        self.entries.append((k[:, tail].contiguous(), v[:, tail].contiguous()))


# --- blocks ---------------------------------------------------------------------------------------


class JointAttention(nn.Module):
    """Double-stream attention: image and text have their own projections, attend jointly."""

    kv_recorder: KVTail | None = None  # set by ``Flux2DiT.recording_kv``

    def __init__(self, cfg: Flux2DiTConfig):
        super().__init__()
        dim, self.head_dim = cfg.hidden_size, cfg.head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (
            nn.Linear(dim, dim, bias=False) for _ in range(3)
        )
        self.norm_q, self.norm_k = (
            nn.RMSNorm(cfg.head_dim, eps=cfg.eps),
            nn.RMSNorm(cfg.head_dim, eps=cfg.eps),
        )
        self.norm_added_q = nn.RMSNorm(cfg.head_dim, eps=cfg.eps)
        self.norm_added_k = nn.RMSNorm(cfg.head_dim, eps=cfg.eps)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.to_add_out = nn.Linear(dim, dim, bias=False)

    def forward(
        self, img: Tensor, txt: Tensor, rope: tuple[Tensor, Tensor], extra_kv
    ) -> tuple[Tensor, Tensor]:
        heads = (-1, self.head_dim)
        q = torch.cat([self.norm_added_q(self.add_q_proj(txt).unflatten(-1, heads)),
                       self.norm_q(self.to_q(img).unflatten(-1, heads))], dim=1)  # fmt: skip
        k = torch.cat([self.norm_added_k(self.add_k_proj(txt).unflatten(-1, heads)),
                       self.norm_k(self.to_k(img).unflatten(-1, heads))], dim=1)  # fmt: skip
        v = torch.cat([self.add_v_proj(txt).unflatten(-1, heads), self.to_v(img).unflatten(-1, heads)], dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.kv_recorder is not None:
            self.kv_recorder(k, v)
        out = attention(q, k, v, extra_kv)
        txt_out, img_out = out.split([txt.shape[1], img.shape[1]], dim=1)
        return self.to_out[0](img_out), self.to_add_out(txt_out)


class DoubleStreamBlock(nn.Module):
    def __init__(self, cfg: Flux2DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointAttention(cfg)
        self.ff = FeedForward(cfg.hidden_size, cfg.mlp_hidden)
        self.ff_context = FeedForward(cfg.hidden_size, cfg.mlp_hidden)

    def forward(
        self, img: Tensor, txt: Tensor, mod_img, mod_txt, rope, extra_kv=None
    ) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt

        img_attn, txt_attn = self.attn(
            modulate(_layer_norm(img, self.eps), img_shift1, img_scale1),
            modulate(_layer_norm(txt, self.eps), txt_shift1, txt_scale1),
            rope,
            extra_kv,
        )
        img = img + img_gate1 * img_attn
        img = img + img_gate2 * self.ff(modulate(_layer_norm(img, self.eps), img_shift2, img_scale2))
        txt = txt + txt_gate1 * txt_attn
        txt = txt + txt_gate2 * self.ff_context(modulate(_layer_norm(txt, self.eps), txt_shift2, txt_scale2))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class FusedSelfAttention(nn.Module):
    """Single-stream: one projection yields Q, K, V and the MLP input; one projection merges both outputs."""

    kv_recorder: KVTail | None = None  # set by ``Flux2DiT.recording_kv``

    def __init__(self, cfg: Flux2DiTConfig):
        super().__init__()
        dim, self.head_dim, self.mlp_hidden = cfg.hidden_size, cfg.head_dim, cfg.mlp_hidden
        self.to_qkv_mlp_proj = nn.Linear(dim, 3 * dim + 2 * cfg.mlp_hidden, bias=False)
        self.norm_q, self.norm_k = (
            nn.RMSNorm(cfg.head_dim, eps=cfg.eps),
            nn.RMSNorm(cfg.head_dim, eps=cfg.eps),
        )
        self.to_out = nn.Linear(dim + cfg.mlp_hidden, dim, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], extra_kv) -> Tensor:
        dim = x.shape[-1]
        q, k, v, mlp_in = self.to_qkv_mlp_proj(x).split([dim, dim, dim, 2 * self.mlp_hidden], dim=-1)
        heads = (-1, self.head_dim)
        q = apply_rope(self.norm_q(q.unflatten(-1, heads)), *rope)
        k = apply_rope(self.norm_k(k.unflatten(-1, heads)), *rope)
        v = v.unflatten(-1, heads)
        if self.kv_recorder is not None:
            self.kv_recorder(k, v)
        out = attention(q, k, v, extra_kv)
        return self.to_out(torch.cat([out, swiglu(mlp_in)], dim=-1))


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: Flux2DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = FusedSelfAttention(cfg)

    def forward(self, x: Tensor, mod, rope, extra_kv=None) -> Tensor:
        shift, scale, gate = mod
        x = x + gate * self.attn(modulate(_layer_norm(x, self.eps), shift, scale), rope, extra_kv)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class OutputHead(nn.Module):
    """AdaLN (scale first, then shift) and the projection back to latent channels."""

    def __init__(self, cfg: Flux2DiTConfig):
        super().__init__()
        self.eps = cfg.eps
        self.linear = nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return modulate(_layer_norm(x, self.eps), shift, scale)


# --- the model ------------------------------------------------------------------------------------


class Flux2DiT(PretrainedModule, nn.Module):
    config_class = Flux2DiTConfig
    config_format = "diffusers"
    weights_stem = "diffusion_pytorch_model"

    def __init__(self, config: Flux2DiTConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.hidden_size
        self.time_guidance_embed = TimeEmbedding(cfg)
        self.double_stream_modulation_img = Modulation(dim, sets=2)
        self.double_stream_modulation_txt = Modulation(dim, sets=2)
        self.single_stream_modulation = Modulation(dim, sets=1)
        self.x_embedder = nn.Linear(cfg.in_channels, dim, bias=False)
        self.context_embedder = nn.Linear(cfg.text_dim, dim, bias=False)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(cfg) for _ in range(cfg.num_double_blocks))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(cfg) for _ in range(cfg.num_single_blocks)
        )
        self.norm_out = OutputHead(cfg)
        self.proj_out = nn.Linear(dim, cfg.out_channels, bias=False)
        self.gradient_checkpointing = False
        # entered around each checkpointed block's recomputation (backbones/checkpointing.py)
        self.recompute_context: RecomputeContext | None = None

    # -- the KV door ------------------------------------------------------------------------------

    @property
    def kv_block_specs(self) -> dict[str, KVBlockSpec]:
        """Every block that accepts template KV tokens, by its cache name (DESIGN.md 4.1)."""
        spec = KVBlockSpec(self.config.num_heads, self.config.head_dim)
        names = [f"double_{i}" for i in range(self.config.num_double_blocks)]
        names += [f"single_{i}" for i in range(self.config.num_single_blocks)]
        return dict.fromkeys(names, spec)

    def validate_kv_cache(self, kv_cache: KVCache | None, batch_size: int | None = None, source=None) -> None:
        validate_kv_cache(kv_cache, self.kv_block_specs, batch_size, source)

    @contextlib.contextmanager
    def recording_kv(self, tokens: int) -> Iterator[KVTail]:
        """Inside, every block's attention hands its last ``tokens`` keys and values to the yielded
        ``KVTail`` (``kv_of_record`` names them like a KV cache)."""
        recorder = KVTail(tokens)
        modules = [b.attn for b in (*self.transformer_blocks, *self.single_transformer_blocks)]
        for module in modules:
            module.kv_recorder = recorder
        try:
            yield recorder
        finally:
            for module in modules:
                module.kv_recorder = None

    def kv_of_record(self, recorder: KVTail) -> dict[str, tuple[Tensor, Tensor]] | None:
        """A whole forward's recording as a KV cache, or None when it did not run every block."""
        names = list(self.kv_block_specs)
        return dict(zip(names, recorder.entries)) if len(recorder.entries) == len(names) else None

    @torch.no_grad()
    def reference_kv(
        self, tokens: Tensor, ids: Tensor, timestep: float = 0.0
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Each block's keys and values of reference tokens ``[B, M, C]`` (position ids ``[M, 4]``) that
        attend only to themselves, modulated at a fixed ``timestep`` (klein-9B-KV: 0): what such a model
        appends to every denoising step's attention. They never see the text or the latents, so one
        pass serves every step, both CFG sides and any batch."""
        dtype = tokens.dtype
        sigma = torch.full((tokens.shape[0],), timestep, dtype=dtype, device=tokens.device)
        temb = self.time_guidance_embed(sigma * 1000, None)
        mod_img = self.double_stream_modulation_img(temb)
        (mod_single,) = self.single_stream_modulation(temb)
        img = self.x_embedder(tokens)
        no_text = img[:, :0]  # an empty text stream: reference tokens attend to each other only
        rope = rope_cos_sin(ids, self.config.axes_dims_rope, self.config.rope_theta)
        with self.recording_kv(tokens.shape[1]) as recorder:
            for block in self.transformer_blocks:
                img, no_text = block(img, no_text, mod_img, mod_img, rope)
            for block in self.single_transformer_blocks:
                img = block(img, mod_single, rope)
        return self.kv_of_record(recorder)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.gradient_checkpointing = enabled

    @property
    def num_blocks(self) -> int:
        """Transformer blocks one forward runs (what a step cache counts)."""
        return self.config.num_double_blocks + self.config.num_single_blocks

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> Tensor:
        """Predict the flow velocity for image tokens ``[B, N_img, C]``.

        ``timestep`` is sigma in [0, 1] per sample; ``img_ids``/``txt_ids`` are position ids ``[N, 4]``
        or ``[B, N, 4]``; ``kv_cache`` maps ``double_{i}`` / ``single_{i}`` to extra ``(k, v)``.
        """
        self._check_inputs(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids)
        if not getattr(self, "kv_cache_prevalidated", False):  # a sampler checked it once per call
            self.validate_kv_cache(kv_cache, batch_size=hidden_states.shape[0])
        kv_cache = kv_cache or {}
        dtype = hidden_states.dtype

        temb = self.time_guidance_embed(
            timestep.to(dtype) * 1000, None if guidance is None else guidance.to(dtype) * 1000
        )
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        (mod_single,) = self.single_stream_modulation(temb)

        img = self.x_embedder(hidden_states)
        txt = self.context_embedder(encoder_hidden_states)
        # text tokens come first in the joint sequence, so their positions do too
        rope = rope_cos_sin(_joint_ids(txt_ids, img_ids), self.config.axes_dims_rope, self.config.rope_theta)

        # a step cache (pipelines/step_cache.py) sees the image tokens after its probe blocks and may
        # forecast the rest of the stack instead of running it; None (the default) changes nothing
        cache = getattr(self, "block_cache", None)
        probe = 0 if cache is None else min(cache.probe_blocks, len(self.transformer_blocks))
        doubles = list(enumerate(self.transformer_blocks))
        for i, block in doubles[:probe]:
            img, txt = self._run(block, img, txt, mod_img, mod_txt, rope, kv_cache.get(f"double_{i}"))
        if cache is not None:
            signal = img if probe else modulate(_layer_norm(img, self.config.eps), *mod_img[0][:2])
            reused = cache.reuse(img, signal, self.num_blocks - probe)
            if reused is not None:
                return self.proj_out(self.norm_out(reused, temb))

        for i, block in doubles[probe:]:
            img, txt = self._run(block, img, txt, mod_img, mod_txt, rope, kv_cache.get(f"double_{i}"))

        x = torch.cat([txt, img], dim=1)
        for i, block in enumerate(self.single_transformer_blocks):
            x = self._run(block, x, mod_single, rope, kv_cache.get(f"single_{i}"))

        img = x[:, txt.shape[1] :]
        if cache is not None:
            cache.record(img)
        return self.proj_out(self.norm_out(img, temb))

    def _run(self, block: nn.Module, *args):
        return run_block(
            block, *args, enabled=self.gradient_checkpointing, recompute_context=self.recompute_context
        )

    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids) -> None:
        cfg = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}; expected [B, N, {cfg.in_channels}]"
            )
        batch = hidden_states.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.text_dim:
            raise ValueError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected [B, L, {cfg.text_dim}]"
            )
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != hidden_states batch {batch}"
            )
        if timestep.ndim != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep has shape {tuple(timestep.shape)}; expected [{batch}] (sigma per sample)"
            )
        for name, ids, n in (
            ("img_ids", img_ids, hidden_states.shape[1]),
            ("txt_ids", txt_ids, encoder_hidden_states.shape[1]),
        ):
            naxes = len(cfg.axes_dims_rope)
            if ids.ndim not in (2, 3) or ids.shape[-2] != n or ids.shape[-1] != naxes:
                raise ValueError(
                    f"{name} has shape {tuple(ids.shape)}; expected [{n}, {naxes}] or [B, {n}, {naxes}]"
                )

    # -- loading ----------------------------------------------------------------------------------


def _joint_ids(txt_ids: Tensor, img_ids: Tensor) -> Tensor:
    """Position ids of the joint [text, image] sequence; ``[N, 4]`` when shared, else ``[B, N, 4]``."""
    if txt_ids.ndim == 2 and img_ids.ndim == 2:
        return torch.cat([txt_ids, img_ids], dim=0)
    txt_ids = txt_ids if txt_ids.ndim == 3 else txt_ids[None]
    img_ids = img_ids if img_ids.ndim == 3 else img_ids[None]
    batch = max(txt_ids.shape[0], img_ids.shape[0])
    return torch.cat([txt_ids.expand(batch, -1, -1), img_ids.expand(batch, -1, -1)], dim=1)
