"""``value_kv``: a few scalars -> per-block KV tokens (brightness, sharpness, age, soft RGB color).

Each value is mapped to [0, 1] by its declared range, multiplied by 1000 and embedded like a diffusion
timestep (256 sinusoidal channels, cosines first). The embeddings of all values are concatenated and,
per DiT block and separately for K and V, an MLP turns them into one vector that is broadcast to
``length`` tokens and added to a learned positional embedding; the result is split into heads.

With one value in [0, 1] the parameters are exactly those of DiffSynth-Studio's brightness example
(``proj_k.{block}.prefer_value_embedder.{0,2}.{weight,bias}``, ``proj_k.{block}.positional_embedding``,
the same for ``proj_v``), so its published checkpoints load as they are. Several values only widen the
first Linear (``256 * n`` inputs): concatenating keeps one MLP per block instead of one per value.

Initialization (ours; a loaded checkpoint replaces it): the MLP's last layer is zero and the
positional embeddings are small (std 0.02), so an untrained template appends near-zero tokens that
take a little attention mass and carry almost nothing. Appended KV is never an exact no-op (no mask).

Typical KV length: ``length`` (512) tokens in every one of the 25 klein-4B blocks. Parameters at
klein-4B size, one value, L = 512: 590.1 M (two 11.8 M encoders per block); R, G, B: 668.8 M;
klein-9B (32 blocks of 32 x 128): 1.28 B. Measured on the meta device (tests/templates/test_zoo.py).
"""

from __future__ import annotations

import keyword
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...backbones.flux2_dit import Flux2DiTConfig
from ...backbones.zimage_dit import ZImageDiTConfig
from ...loading.meta_init import scaled_normal_
from ..base import TemplateModel
from ..registry import register_architecture
from ..schema import RESERVED_KEYS, InputField, InputSchema
from ._common import (
    DiTConfig,
    TemplateConfigError,
    base_layout,
    check_names,
    check_positive,
    kv_block_names,
    parameter_device,
    parameter_dtype,
    sinusoidal_embedding,
    tiny_dit_config,
    tiny_zimage_dit_config,
)

VALUE_TIME_SCALE = 1000.0  # a value in [0, 1] is embedded as a timestep in [0, 1000]


@dataclass
class ValueKVConfig:
    """Defaults: one ``scale`` value in [0, 1] for every klein-4B block, 512 tokens (the reference)."""

    values: tuple[str, ...] = ("scale",)
    block_names: tuple[str, ...] = field(default_factory=lambda: kv_block_names(Flux2DiTConfig.klein_4b()))
    dim: int = 3072  # heads * head_dim of the base DiT
    num_heads: int = 24
    length: int = 512
    # (low, high) of each value, mapped to [0, 1] before embedding; None: [0, 1] for every value
    ranges: tuple[tuple[float, float], ...] | None = None
    embed_dim: int = 256  # sinusoidal channels per value

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.values = check_names(owner, "values", self.values)
        for name in self.values:
            if not name.isidentifier() or keyword.iskeyword(name) or name in RESERVED_KEYS:
                raise TemplateConfigError(
                    f"{owner}.values holds {name!r}; value names must be identifiers and not one of {RESERVED_KEYS}"
                )
        self.block_names = check_names(owner, "block_names", self.block_names)
        check_positive(owner, dim=self.dim, num_heads=self.num_heads, embed_dim=self.embed_dim)
        if self.dim % self.num_heads:
            raise TemplateConfigError(
                f"{owner}.dim {self.dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.embed_dim % 2:
            raise TemplateConfigError(
                f"{owner}.embed_dim must be even (cosines + sines), got {self.embed_dim}"
            )
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise TemplateConfigError(
                f"{owner}.length must be an integer >= 0 (tokens per block), got {self.length!r}"
            )
        ranges = [(0.0, 1.0)] * len(self.values) if self.ranges is None else list(self.ranges)
        if len(ranges) != len(self.values):
            raise TemplateConfigError(
                f"{owner}.ranges has {len(ranges)} entries for {len(self.values)} values {self.values}; give one (low, high) per value"
            )
        self.ranges = tuple((float(lo), float(hi)) for lo, hi in ranges)
        for name, (lo, hi) in zip(self.values, self.ranges):
            if not lo < hi:
                raise TemplateConfigError(f"{owner}.ranges for {name!r} is ({lo}, {hi}); expected low < high")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def for_dit(
        cls,
        dit_config: DiTConfig,
        values: tuple[str, ...] = ("scale",),
        length: int = 512,
        ranges: tuple[tuple[float, float], ...] | None = None,
        **kwargs: Any,
    ) -> ValueKVConfig:
        """Every KV block of ``dit_config`` (FLUX.2 or Z-Image), with its heads and widths."""
        layout = base_layout(dit_config)
        return cls(
            values=tuple(values),
            block_names=layout.block_names,
            dim=layout.num_heads * layout.head_dim,
            num_heads=layout.num_heads,
            length=length,
            ranges=ranges,
            **kwargs,
        )

    @classmethod
    def klein_4b(cls, values=("scale",), length: int = 512, ranges=None, **kwargs: Any) -> ValueKVConfig:
        return cls.for_dit(Flux2DiTConfig.klein_4b(), values, length, ranges, **kwargs)

    @classmethod
    def klein_9b(cls, values=("scale",), length: int = 512, ranges=None, **kwargs: Any) -> ValueKVConfig:
        return cls.for_dit(Flux2DiTConfig.klein_9b(), values, length, ranges, **kwargs)

    @classmethod
    def z_image(cls, values=("scale",), length: int = 512, ranges=None, **kwargs: Any) -> ValueKVConfig:
        """Z-Image Turbo / base: the 30 main blocks, 30 heads x 128."""
        return cls.for_dit(ZImageDiTConfig(), values, length, ranges, **kwargs)

    @classmethod
    def tiny(cls, values=("scale",), length: int = 4, ranges=None, **kwargs: Any) -> ValueKVConfig:
        """Matches ``random_flux2_pipeline()``'s DiT."""
        return cls.for_dit(tiny_dit_config(), values, length, ranges, **kwargs)

    @classmethod
    def tiny_zimage(cls, values=("scale",), length: int = 4, ranges=None, **kwargs: Any) -> ValueKVConfig:
        """Matches ``random_zimage_pipeline()``'s DiT."""
        return cls.for_dit(tiny_zimage_dit_config(), values, length, ranges, **kwargs)


class ValueEncoder(nn.Module):
    """Value embedding ``[1, dim_in]`` -> ``length`` tokens ``[length, dim]`` (one per block and K or V)."""

    def __init__(self, dim_in: int, dim: int, length: int):
        super().__init__()
        self.length = length
        self.prefer_value_embedder = nn.Sequential(nn.Linear(dim_in, dim), nn.SiLU(), nn.Linear(dim, dim))
        # randn(length, dim) * 0.02 as an initializer a meta-device build skips (loading.meta_init)
        self.positional_embedding = nn.Parameter(scaled_normal_(torch.empty(length, dim), mul=0.02))
        # untrained, the tokens are small and value-independent (see the module docstring)
        nn.init.zeros_(self.prefer_value_embedder[2].weight)
        nn.init.zeros_(self.prefer_value_embedder[2].bias)

    def forward(self, embedding: Tensor, out: Tensor | None = None) -> Tensor:
        """``out``: a ``[length, dim]`` tensor to write the tokens into (the same values)."""
        shared = self.prefer_value_embedder(embedding).squeeze(0)  # [dim]
        if out is None:
            return shared.expand(self.length, -1) + self.positional_embedding
        return torch.add(self.positional_embedding, shared, out=out)  # IEEE addition commutes: same bits


@register_architecture("value_kv")
class ValueKV(TemplateModel):
    """Scalars -> ``{"kv_cache": {block: (k, v)}}`` with ``k, v: [1, length, heads, head_dim]``.

    Inputs: one float per configured value, inside its range (brightness and sharpness ``scale`` in
    [0, 1]; age in years with e.g. ``ranges=((0, 100),)``; color ``R``, ``G``, ``B`` in [0, 1]).
    """

    config_class = ValueKVConfig
    # the value names come from the config: the instance's schema is set in __init__ and written to
    # template.json by ``template_spec``; process_inputs checks the inputs itself too
    input_schema = None
    cache_keys = ("kv_cache",)
    writes_kv_out = True

    def __init__(self, config: ValueKVConfig):
        super().__init__()
        self.config = config
        self.input_schema = InputSchema(
            [
                InputField(name, "float", minimum=lo, maximum=hi, description=f"{name} in [{lo}, {hi}]")
                for name, (lo, hi) in zip(config.values, config.ranges)
            ]
        )
        dim_in = config.embed_dim * len(config.values)
        self.proj_k = nn.ModuleDict(
            {b: ValueEncoder(dim_in, config.dim, config.length) for b in config.block_names}
        )
        self.proj_v = nn.ModuleDict(
            {b: ValueEncoder(dim_in, config.dim, config.length) for b in config.block_names}
        )

    @torch.no_grad()
    def process_inputs(self, pipe: Any = None, **inputs: Any) -> dict[str, Tensor]:
        """The values mapped to [0, 1] by their ranges, in config order: ``{"value": [n_values]}``."""
        checked = InputSchema(self.input_schema.fields, allow_extra=True).validate(inputs, "value_kv")
        unit = [(checked[n] - lo) / (hi - lo) for n, (lo, hi) in zip(self.config.values, self.config.ranges)]
        return {"value": torch.tensor(unit, dtype=torch.float32, device=parameter_device(self))}

    def forward(
        self, pipe: Any = None, value: Tensor | None = None, kv_out: Any = None, **features: Any
    ) -> dict[str, Any]:
        """``kv_out``: where the pipeline merges this output's KV (``templates.stream_merge.KVOut``);
        tokens are written there when it offers the rows."""
        cfg = self.config
        if value is None or value.numel() != len(cfg.values):
            got = None if value is None else tuple(value.shape)
            raise TemplateConfigError(
                f"value_kv.forward needs 'value' with {len(cfg.values)} entries ({cfg.values}), got {got}; "
                "pass the output of process_inputs"
            )
        dtype = parameter_dtype(self)
        # scaled in the model's dtype, as the reference does: in bf16 the embedded timestep is rounded
        # exactly as it was when published templates were trained
        times = value.reshape(-1).to(dtype) * VALUE_TIME_SCALE
        embedding = sinusoidal_embedding(times, cfg.embed_dim).reshape(1, -1).to(dtype)  # [1, n * 256]
        heads = (1, cfg.length, cfg.num_heads, cfg.head_dim)
        kv_cache = {}
        for b in cfg.block_names:
            entry = []
            for index, proj in enumerate((self.proj_k[b], self.proj_v[b])):
                rows = kv_out.rows(b, index, heads, dtype) if kv_out is not None else None
                tokens = proj(embedding, None if rows is None else rows.view(cfg.length, cfg.dim))
                entry.append(tokens.reshape(heads) if rows is None else rows)
            kv_cache[b] = tuple(entry)
        return {"kv_cache": kv_cache}
