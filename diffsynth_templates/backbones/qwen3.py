"""The Qwen3 decoder used as a text encoder (FLUX.2-klein reads its intermediate hidden states).

It is the language model without its head: token embedding, ``num_hidden_layers`` pre-norm decoder
layers (grouped-query attention with per-head RMSNorm on q and k, rotate-half RoPE, SwiGLU MLP) and
a final RMSNorm. Parameter names follow the official ``text_encoder/`` checkpoints
(``model.embed_tokens.weight``, ``model.layers.{i}...``, ``model.norm.weight``) so they load
without renaming; an ``lm_head.weight`` in the folder is ignored, never built.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loading.model_loading import PretrainedModule


@dataclass
class Qwen3Config:
    """Architecture of a Qwen3 decoder; defaults are Qwen3-4B, the FLUX.2-klein-4B text encoder."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for round trips

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Qwen3Config.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Qwen3Config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"Qwen3Config.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"Qwen3Config.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.hidden_act != "silu":
            raise ValueError(
                f"Qwen3Config.hidden_act {self.hidden_act!r} is not supported; Qwen3 uses 'silu'"
            )

    @classmethod
    def from_dict(cls, d: dict) -> Qwen3Config:
        """Read a transformers ``config.json`` of a ``Qwen3ForCausalLM`` (transformers 4 or 5 layout)."""
        model_type = d.get("model_type", "qwen3")
        if model_type != "qwen3":
            raise ValueError(
                f"config.json has model_type {model_type!r}; Qwen3TextEncoder reads 'qwen3' only"
            )
        if d.get("use_sliding_window"):
            raise ValueError(
                "config.json enables use_sliding_window, which Qwen3TextEncoder does not implement"
            )
        # transformers 5 moved rope_theta (and any scaling) into rope_parameters; older files keep them flat
        rope = dict(d.get("rope_parameters") or {})
        rope_type = rope.get("rope_type") or (d.get("rope_scaling") or {}).get("rope_type") or "default"
        if rope_type != "default":
            raise ValueError(
                f"config.json asks for RoPE type {rope_type!r}; only 'default' RoPE is implemented"
            )
        theta = rope.get("rope_theta", d.get("rope_theta", cls.rope_theta))

        ours = {f.name for f in fields(cls)} - {"extra", "rope_theta"}
        kwargs = {k: v for k, v in d.items() if k in ours}
        if kwargs.get("head_dim") is None:  # old configs derive it from the width
            hidden = kwargs.get("hidden_size", cls.hidden_size)
            kwargs["head_dim"] = hidden // kwargs.get("num_attention_heads", cls.num_attention_heads)
        extra = {k: v for k, v in d.items() if k not in ours and k != "rope_theta"}
        return cls(**kwargs, rope_theta=float(theta), extra=extra)

    def to_dict(self) -> dict:
        """A ``config.json`` that transformers 5 (and this class) can read back."""
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
        d["architectures"] = ["Qwen3ForCausalLM"]
        d["model_type"] = "qwen3"
        return {**{k: v for k, v in self.extra.items() if k not in ("rope_theta", "rope_scaling")}, **d}

    @classmethod
    def qwen3_4b(cls) -> Qwen3Config:
        """The FLUX.2-klein-4B text encoder."""
        return cls()

    @classmethod
    def qwen3_8b(cls) -> Qwen3Config:
        """The FLUX.2-klein-9B text encoder."""
        return cls(hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)


# --- small pure functions ------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm computed in float32; the scale is applied after casting back, as Qwen3 was trained."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_cos_sin(
    length: int, head_dim: int, theta: float, device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Rotate-half RoPE tables ``[L, head_dim]`` for positions ``0..L-1`` (angles in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, H, L, D]``: the first half of each head pairs with the second half."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention_mask_4d(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Causal AND key-not-padding as a boolean ``[B, 1, L, L]`` mask (True = may attend), plus the rows
    ``[B, 1, L, 1]`` that see no key at all (pads left of every real token).

    Those rows are opened in the mask so softmax stays finite and their attention output is then set
    to zero, which is what recent PyTorch SDPA (and so transformers) gives for fully masked rows.
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    dead = ~allowed.any(dim=-1, keepdim=True)
    return allowed | dead, dead


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: tuple[Tensor, Tensor] | None) -> Tensor:
    """SDPA over ``[B, H, L, D]``: plain causal without padding, else the mask of ``attention_mask_4d``."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    allowed, dead = mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).masked_fill(dead, 0.0)


# --- modules -------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Qwen3Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: tuple[Tensor, Tensor] | None) -> Tensor:
        q = self.q_norm(self.q_proj(x).unflatten(-1, (self.heads, self.head_dim))).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        # grouped-query attention: query head h reads key/value head h // (heads / kv_heads)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = masked_attention(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class Qwen3MLP(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Qwen3Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = Qwen3MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Model(nn.Module):
    """The parameter container; it sits under ``model.`` so state-dict keys match the checkpoints."""

    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Qwen3DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3TextEncoder(PretrainedModule, nn.Module):
    config_class = Qwen3Config
    weights_stem = "model"
    # the 9B encoder ships its (untied) LM head; an encoder never uses it
    load_options = {"ignore_keys": lambda key: key.startswith("lm_head.")}

    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states_layers: Sequence[int] = (-1,),
    ) -> tuple[Tensor, ...]:
        """Hidden states ``[B, L, hidden]`` at the requested indices, in the order requested.

        Indexing follows transformers' ``output_hidden_states``: 0 is the token embedding, ``i`` the
        output of decoder layer ``i`` (1-based), and ``num_hidden_layers`` (or -1) the last layer's
        output after the final norm. Layers past the largest requested index are not run.
        ``attention_mask`` is ``[B, L]`` with 1 for real tokens and 0 for padding; positions are
        ``0..L-1`` whatever the padding, so pad on the right to keep real tokens at their positions.
        """
        wanted = self._resolve_indices(output_hidden_states_layers)
        self._check_inputs(input_ids, attention_mask)
        n_layers = self.config.num_hidden_layers
        mask = (
            None
            if attention_mask is None or bool(attention_mask.all())
            else attention_mask_4d(attention_mask)
        )

        x = self.model.embed_tokens(input_ids)
        rope = rope_cos_sin(
            input_ids.shape[1], self.config.head_dim, self.config.rope_theta, x.device, x.dtype
        )
        states = {0: x}
        for i, layer in enumerate(self.model.layers[: min(max(wanted), n_layers)], start=1):
            x = layer(x, rope, mask)
            states[i] = x
        if n_layers in wanted:
            states[n_layers] = self.model.norm(x)
        return tuple(states[i] for i in wanted)

    def _resolve_indices(self, indices: Sequence[int]) -> list[int]:
        count = self.config.num_hidden_layers + 1
        if isinstance(indices, int) or len(indices) == 0:
            raise ValueError(
                f"output_hidden_states_layers must be a non-empty sequence of ints, got {indices!r}"
            )
        out = []
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not -count <= i < count:
                raise ValueError(
                    f"hidden-state index {i!r} is out of range: this encoder has {count} hidden states "
                    f"(0 = embeddings ... {count - 1} = final normed output); use -{count}..{count - 1}"
                )
            out.append(i % count)
        return out

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        if input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(
                f"input_ids must be an integer tensor [batch, length], got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )

    # -- loading ----------------------------------------------------------------------------------
