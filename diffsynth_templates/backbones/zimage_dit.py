"""The Z-Image diffusion transformer (Turbo and base share it) with native KV-cache attention.

Layout (a single-stream DiT): latents are cut into 2x2 patches and embedded; the image tokens pass
``num_refiner_layers`` noise-refiner blocks (modulated by the timestep), the caption features pass
``num_refiner_layers`` context-refiner blocks (unmodulated); then the sequence ``[image, caption]``
passes ``num_layers`` main blocks and an AdaLN output head, and the image tokens are folded back
into latents. Every block is the same: sandwich RMSNorm around attention and a SwiGLU MLP, per-block
AdaLN (scale and tanh gate, no shift), QK-RMSNorm and interleaved 3-axis RoPE over
(caption index, row, column).

Each caption and each image is padded to a multiple of 32 tokens with a learned pad token
(``cap_pad_token`` / ``x_pad_token``); samples of different lengths in one batch are padded further
with zeros and hidden by an attention mask. Parameter names follow the official diffusers
``transformer/`` checkpoints (``ZImageTransformer2DModel``) so they load without renaming.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from ..loading.model_loading import PretrainedModule
from .attention import (
    KVBlockSpec,
    KVCache,
    apply_rope,
    attention,
    check_rope_axes,
    validate_kv_cache,
)
from .checkpointing import RecomputeContext, run_block
from .flux2_dit import timestep_embedding

SEQ_MULTIPLE = 32  # captions and images are each padded to a multiple of this many tokens
ADALN_DIM = 256  # width of the timestep embedding the AdaLN layers read (capped by the model width)
TIME_HIDDEN = 1024  # hidden width of the timestep MLP
QK_NORM_EPS = 1e-5  # fixed in the reference, not a config field


@dataclass
class ZImageDiTConfig:
    in_channels: int = 16
    dim: int = 3840
    num_layers: int = 30
    num_refiner_layers: int = 2
    num_heads: int = 30
    num_kv_heads: int = 30  # recorded for round trips; the reference ignores it (full multi-head)
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    siglip_feat_dim: int | None = None  # set only by Z-Image Omni checkpoints, which are not implemented
    extra: dict = field(default_factory=dict, repr=False)  # unknown config.json keys, kept for round trips

    def __post_init__(self) -> None:
        for name in ("axes_dims", "axes_lens", "all_patch_size", "all_f_patch_size"):
            setattr(self, name, tuple(int(a) for a in getattr(self, name)))
        for name in ("in_channels", "dim", "num_heads", "cap_feat_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ZImageDiTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_layers < 0 or self.num_refiner_layers < 0:
            raise ValueError("ZImageDiTConfig layer counts must be >= 0")
        if self.dim % self.num_heads:
            raise ValueError(
                f"ZImageDiTConfig.dim {self.dim} must be divisible by num_heads {self.num_heads}"
            )
        check_rope_axes(self.axes_dims, self.head_dim, "ZImageDiTConfig.axes_dims")
        if len(self.axes_lens) != len(self.axes_dims):
            raise ValueError(f"axes_lens {self.axes_lens} needs one length per RoPE axis {self.axes_dims}")
        if len(self.all_patch_size) != len(self.all_f_patch_size) or not self.all_patch_size:
            raise ValueError("all_patch_size and all_f_patch_size must be non-empty and of equal length")
        if self.siglip_feat_dim is not None:
            raise ValueError(
                "siglip_feat_dim is set: this is a Z-Image Omni checkpoint, which ZImageDiT does not implement "
                "(use the Turbo or base transformer)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_DIM)

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim / 3 * 8)

    # diffusers config.json names <-> ours
    _DIFFUSERS_NAMES = {
        "n_layers": "num_layers",
        "n_refiner_layers": "num_refiner_layers",
        "n_heads": "num_heads",
        "n_kv_heads": "num_kv_heads",
    }

    @classmethod
    def from_diffusers(cls, config: dict) -> ZImageDiTConfig:
        ours = {f.name for f in fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for key, value in config.items():
            name = cls._DIFFUSERS_NAMES.get(key, key)
            if name in ours:
                kwargs[name] = value
            elif not key.startswith("_"):  # _class_name, _diffusers_version: rewritten on save
                extra[key] = value
        return cls(**kwargs, extra=extra)

    def to_diffusers(self) -> dict:
        back = {v: k for k, v in self._DIFFUSERS_NAMES.items()}
        d = {back.get(k, k): list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        d.pop("extra")
        return {"_class_name": "ZImageTransformer2DModel", **self.extra, **d}

    @classmethod
    def official(cls) -> ZImageDiTConfig:
        """Z-Image-Turbo and Z-Image (base): 6B, 3840 wide = 30 heads x 128, 30 + 2 + 2 blocks."""
        return cls()


# --- small building blocks -----------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with the statistics in float32 and the weight applied in the weight's dtype (as diffusers)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


class TimestepEmbedder(nn.Module):
    def __init__(self, out_dim: int, channels: int = 256):
        super().__init__()
        self.channels = channels
        self.mlp = nn.Sequential(nn.Linear(channels, TIME_HIDDEN), nn.SiLU(), nn.Linear(TIME_HIDDEN, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.channels).to(self.mlp[0].weight.dtype))


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ZImageDiTConfig):
        super().__init__()
        dim, self.head_dim = cfg.dim, cfg.head_dim
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.norm_q = RMSNorm(cfg.head_dim, QK_NORM_EPS) if cfg.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(cfg.head_dim, QK_NORM_EPS) if cfg.qk_norm else nn.Identity()
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])  # ".0" in the checkpoint names

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, extra_kv=None) -> Tensor:
        heads = (-1, self.head_dim)
        q = apply_rope(self.norm_q(self.to_q(x).unflatten(-1, heads)), *rope)
        k = apply_rope(self.norm_k(self.to_k(x).unflatten(-1, heads)), *rope)
        v = self.to_v(x).unflatten(-1, heads)
        return self.to_out[0](attention(q, k, v, extra_kv, mask=mask))


class ZImageBlock(nn.Module):
    """Sandwich-normed attention and SwiGLU; with ``modulation`` each is scaled and tanh-gated by the timestep."""

    def __init__(self, cfg: ZImageDiTConfig, modulation: bool):
        super().__init__()
        dim, eps = cfg.dim, cfg.norm_eps
        self.attention = SelfAttention(cfg)
        self.feed_forward = FeedForward(dim, cfg.ffn_hidden)
        self.attention_norm1, self.attention_norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * dim)) if modulation else None

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        temb: Tensor | None = None,
        extra_kv: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), rope, mask, extra_kv))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))

        if temb is None:
            raise ValueError("a modulated Z-Image block needs the timestep embedding (temb)")
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.adaLN_modulation(temb).unsqueeze(1).chunk(4, dim=-1)
        h = self.attention(self.attention_norm1(x) * (1.0 + scale_attn), rope, mask, extra_kv)
        x = x + gate_attn.tanh() * self.attention_norm2(h)
        h = self.feed_forward(self.ffn_norm1(x) * (1.0 + scale_ffn))
        return x + gate_ffn.tanh() * self.ffn_norm2(h)


class FinalLayer(nn.Module):
    """LayerNorm scaled by the timestep (no shift), then the projection back to patch channels."""

    def __init__(self, cfg: ZImageDiTConfig, out_features: int):
        super().__init__()
        self.linear = nn.Linear(cfg.dim, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.adaln_dim, cfg.dim))

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        scale = 1.0 + self.adaLN_modulation(temb).unsqueeze(1)
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * scale)


def rope_tables(ids: Tensor, axes_dims: Sequence[int], theta: float) -> tuple[Tensor, Tensor]:
    """Interleaved RoPE cos/sin ``[N, head_dim]`` for integer position ids ``[N, n_axes]``.

    Angles are formed in float64 and rounded to float32 before cos/sin, exactly as the reference's
    precomputed table, so positions in the hundreds rotate identically.
    """
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        angles = (ids[:, axis].to(torch.float64)[:, None] * inv_freq).float()
        cos.append(angles.cos().repeat_interleave(2, dim=-1))
        sin.append(angles.sin().repeat_interleave(2, dim=-1))
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


@dataclass(frozen=True)
class _Layout:
    """Token counts of one sample: real and padded (to SEQ_MULTIPLE) image and caption lengths."""

    grid: tuple[int, int, int]  # (frames, rows, cols) of image tokens
    image_len: int
    caption_tokens: int
    caption_len: int

    @property
    def image_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def _batch(rows: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Zero-pad rows ``[L_i, ...]`` to ``[B, max L, ...]``; the mask (True = real) is None when all fit."""
    lengths = [len(r) for r in rows]
    stacked = pad_sequence(rows, batch_first=True)
    if len(set(lengths)) == 1:
        return stacked, None
    mask = (
        torch.arange(max(lengths), device=stacked.device)[None]
        < torch.tensor(lengths, device=stacked.device)[:, None]
    )
    return stacked, mask


def _batch_rope(tables: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Per-sample RoPE tables ``[L_i, D]``, zero-padded to ``[B, max L, D]`` like the tokens they rotate."""
    return tuple(pad_sequence([table[i] for table in tables], batch_first=True) for i in (0, 1))


def _cat_rope(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])


# --- the model ------------------------------------------------------------------------------------


class ZImageDiT(PretrainedModule, nn.Module):
    config_class = ZImageDiTConfig
    config_format = "diffusers"
    weights_stem = "diffusion_pytorch_model"

    def __init__(self, config: ZImageDiTConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.dim
        patch_channels = {
            f"{p}-{f}": f * p * p * cfg.in_channels for p, f in zip(cfg.all_patch_size, cfg.all_f_patch_size)
        }
        self.all_x_embedder = nn.ModuleDict({k: nn.Linear(c, dim) for k, c in patch_channels.items()})
        self.all_final_layer = nn.ModuleDict({k: FinalLayer(cfg, c) for k, c in patch_channels.items()})
        self.noise_refiner = nn.ModuleList(
            ZImageBlock(cfg, modulation=True) for _ in range(cfg.num_refiner_layers)
        )
        self.context_refiner = nn.ModuleList(
            ZImageBlock(cfg, modulation=False) for _ in range(cfg.num_refiner_layers)
        )
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(
            RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, dim)
        )
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList(ZImageBlock(cfg, modulation=True) for _ in range(cfg.num_layers))
        self.gradient_checkpointing = False
        # entered around each checkpointed block's recomputation (backbones/checkpointing.py)
        self.recompute_context: RecomputeContext | None = None

    # -- the KV door ------------------------------------------------------------------------------

    @property
    def kv_block_specs(self) -> dict[str, KVBlockSpec]:
        """The main blocks accept template KV tokens as ``block_{i}``; the refiners take none."""
        spec = KVBlockSpec(self.config.num_heads, self.config.head_dim)
        return {f"block_{i}": spec for i in range(self.config.num_layers)}

    def validate_kv_cache(self, kv_cache: KVCache | None, batch_size: int | None = None, source=None) -> None:
        validate_kv_cache(kv_cache, self.kv_block_specs, batch_size, source)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.gradient_checkpointing = enabled

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        x: list[Tensor],
        t: Tensor,
        cap_feats: list[Tensor],
        patch_size: int = 2,
        f_patch_size: int = 1,
        kv_cache: KVCache | None = None,
    ) -> list[Tensor]:
        """Model outputs for latents ``x`` (a list of ``[C, F, H, W]``), one per sample, same shapes.

        As ``ZImageTransformer2DModel.forward``: ``t`` ``[B]`` is ``1 - sigma`` (0 = noise, 1 = clean)
        and is multiplied by ``t_scale``; ``cap_feats`` is a list of caption features ``[L_i, cap_feat_dim]``
        (padding already stripped; lengths may differ). The output is the negated flow velocity: the
        sampler steps with ``-output``. ``kv_cache`` maps ``block_{i}`` to extra ``(k, v)`` tokens.
        """
        self._check_inputs(x, t, cap_feats, patch_size, f_patch_size)
        if not getattr(self, "kv_cache_prevalidated", False):  # a sampler checked it once per call
            self.validate_kv_cache(kv_cache, batch_size=len(x))
        kv_cache = kv_cache or {}
        key = f"{patch_size}-{f_patch_size}"
        layouts = [self._layout(xi, ci, patch_size, f_patch_size) for xi, ci in zip(x, cap_feats)]
        temb = self.t_embedder(t * self.config.t_scale).type_as(x[0])

        # image tokens, each sample padded with the learned pad token, refined under the timestep
        img_rows = [
            self._pad_rows(
                self.all_x_embedder[key](_patchify(xi, patch_size, f_patch_size)),
                lay.image_len,
                self.x_pad_token,
            )
            for xi, lay in zip(x, layouts)
        ]
        img_ropes = [self._rope(self._image_ids(lay)) for lay in layouts]
        img, img_mask = _batch(img_rows)
        img_rope = _batch_rope(img_ropes)
        for block in self.noise_refiner:
            img = self._run(block, img, img_rope, img_mask, temb)

        # caption tokens, padded the same way with their own pad token, refined without the timestep
        cap_rows = [
            self._pad_rows(self.cap_embedder(ci), lay.caption_len, self.cap_pad_token)
            for ci, lay in zip(cap_feats, layouts)
        ]
        cap_ropes = [self._rope(self._caption_ids(lay)) for lay in layouts]
        cap, cap_mask = _batch(cap_rows)
        cap_rope = _batch_rope(cap_ropes)
        for block in self.context_refiner:
            cap = self._run(block, cap, cap_rope, cap_mask)

        # one sequence per sample: [image, caption]; ragged samples are zero-padded and masked
        seq, mask = _batch(
            [torch.cat([img[i, : lay.image_len], cap[i, : lay.caption_len]]) for i, lay in enumerate(layouts)]
        )
        rope = _batch_rope([_cat_rope(ir, cr) for ir, cr in zip(img_ropes, cap_ropes)])
        for i, block in enumerate(self.layers):
            seq = self._run(block, seq, rope, mask, temb, kv_cache.get(f"block_{i}"))

        out = self.all_final_layer[key](seq, temb)
        return [
            _unpatchify(out[i, : lay.image_tokens], lay.grid, patch_size, f_patch_size)
            for i, lay in enumerate(layouts)
        ]

    def _run(self, block: nn.Module, *args):
        return run_block(
            block, *args, enabled=self.gradient_checkpointing, recompute_context=self.recompute_context
        )

    # -- sequence layout --------------------------------------------------------------------------

    def _layout(self, image: Tensor, caption: Tensor, patch_size: int, f_patch_size: int) -> _Layout:
        _, frames, height, width = image.shape
        grid = (frames // f_patch_size, height // patch_size, width // patch_size)
        layout = _Layout(grid, _padded(grid[0] * grid[1] * grid[2]), len(caption), _padded(len(caption)))
        # caption positions run 1..caption_len, the image sits right after the padded caption
        needed = (layout.caption_len + grid[0] + 1, grid[1], grid[2])
        for axis, (n, limit) in enumerate(zip(needed, self.config.axes_lens)):
            if n > limit:
                raise ValueError(
                    f"RoPE axis {axis} needs {n} positions but the model has axes_lens[{axis}]={limit}: "
                    "use a shorter prompt (max_sequence_length) or a smaller image"
                )
        return layout

    @staticmethod
    def _caption_ids(lay: _Layout) -> Tensor:
        """(1 + j, 0, 0) for every caption slot j, pad slots included (they continue the count)."""
        ids = torch.zeros(lay.caption_len, 3, dtype=torch.long)
        ids[:, 0] = torch.arange(1, lay.caption_len + 1)
        return ids

    @staticmethod
    def _image_ids(lay: _Layout) -> Tensor:
        """(caption_len + 1 + frame, row, col) for image tokens; pad slots sit at (0, 0, 0)."""
        f, h, w = lay.grid
        grid = torch.stack(
            torch.meshgrid(torch.arange(f), torch.arange(h), torch.arange(w), indexing="ij"), -1
        )
        grid = grid.flatten(0, 2)
        grid[:, 0] += lay.caption_len + 1
        return torch.cat([grid, grid.new_zeros(lay.image_len - lay.image_tokens, 3)])

    def _rope(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        device = self.x_pad_token.device
        return rope_tables(ids.to(device), self.config.axes_dims, self.config.rope_theta)

    @staticmethod
    def _pad_rows(tokens: Tensor, length: int, pad_token: Tensor) -> Tensor:
        return torch.cat([tokens, pad_token.to(tokens.dtype).expand(length - len(tokens), -1)])

    def _check_inputs(self, x, t, cap_feats, patch_size: int, f_patch_size: int) -> None:
        cfg = self.config
        if not isinstance(x, (list, tuple)) or not isinstance(cap_feats, (list, tuple)) or not x:
            raise TypeError("x and cap_feats must be non-empty lists of tensors (one per sample)")
        if any(isinstance(xi, (list, tuple)) for xi in x):
            raise ValueError(
                "nested lists of latents are Z-Image Omni inputs, which ZImageDiT does not implement"
            )
        if len(cap_feats) != len(x):
            raise ValueError(
                f"got {len(x)} latents but {len(cap_feats)} caption features; pass one per sample"
            )
        if (patch_size, f_patch_size) not in zip(cfg.all_patch_size, cfg.all_f_patch_size):
            raise ValueError(
                f"patch_size={patch_size}, f_patch_size={f_patch_size} is not one of this model's "
                f"{list(zip(cfg.all_patch_size, cfg.all_f_patch_size))}"
            )
        for i, xi in enumerate(x):
            if xi.ndim != 4 or xi.shape[0] != cfg.in_channels:
                raise ValueError(f"x[{i}] has shape {tuple(xi.shape)}; expected [{cfg.in_channels}, F, H, W]")
            if xi.shape[1] % f_patch_size or xi.shape[2] % patch_size or xi.shape[3] % patch_size:
                raise ValueError(
                    f"x[{i}] has shape {tuple(xi.shape)}; F must be a multiple of {f_patch_size} and H, W "
                    f"multiples of {patch_size}"
                )
        for i, ci in enumerate(cap_feats):
            if ci.ndim != 2 or ci.shape[-1] != cfg.cap_feat_dim or len(ci) == 0:
                raise ValueError(
                    f"cap_feats[{i}] has shape {tuple(ci.shape)}; expected [L >= 1, {cfg.cap_feat_dim}]"
                )
        if t.ndim != 1 or t.shape[0] not in (1, len(x)):
            raise ValueError(f"t has shape {tuple(t.shape)}; expected [{len(x)}] (1 - sigma per sample)")

    # -- loading ----------------------------------------------------------------------------------


def _patchify(image: Tensor, p: int, pf: int) -> Tensor:
    """``[C, F, H, W]`` -> tokens ``[(F/pf)(H/p)(W/p), pf*p*p*C]``, row-major, channels last in a patch."""
    return rearrange(image, "c (f pf) (h ph) (w pw) -> (f h w) (pf ph pw c)", pf=pf, ph=p, pw=p)


def _unpatchify(tokens: Tensor, grid: tuple[int, int, int], p: int, pf: int) -> Tensor:
    f, h, w = grid
    return rearrange(
        tokens, "(f h w) (pf ph pw c) -> c (f pf) (h ph) (w pw)", f=f, h=h, w=w, pf=pf, ph=p, pw=p
    )
