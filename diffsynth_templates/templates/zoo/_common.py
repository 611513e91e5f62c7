"""Helpers the zoo architectures share: base-model layouts, config checks, position ids, folder specs."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...backbones.flux2_dit import Flux2DiTConfig
from ...backbones.zimage_dit import ZImageDiTConfig
from ...loading.meta_init import meta_build
from ...pipelines.families import FAMILIES, Family, family_of_config
from ...pipelines.families.flux2 import FLUX2
from ...pipelines.families.zimage import ZIMAGE
from ..base import TemplateError
from ..folder import TemplateSpec

DiTConfig = Flux2DiTConfig | ZImageDiTConfig  # the base DiTs templates can be built for


class TemplateConfigError(TemplateError, TypeError):
    """A zoo architecture's config (``template.json``'s ``config``) has a wrong type or value."""


def tiny_dit_config() -> Flux2DiTConfig:
    """The DiT config of ``random_flux2_pipeline()`` (1 double + 2 single blocks, 2 heads x 16)."""
    return FLUX2.tiny_config()


def tiny_zimage_dit_config() -> ZImageDiTConfig:
    """The DiT config of ``random_zimage_pipeline()`` (2 main blocks, 2 heads x 32)."""
    return ZIMAGE.tiny_config()


# --- base-model layouts (each family's record owns its own; these are the names templates use) ----


@dataclass(frozen=True)
class BaseLayout:
    """What a template built for one base DiT must match: its KV blocks, widths and latents."""

    backbone: str  # "flux2" | "zimage"
    block_names: tuple[str, ...]  # KV cache keys (DESIGN.md 4.1)
    num_heads: int
    head_dim: int
    latent_channels: int  # channels of ``pipe.encode_image`` latents
    patch_size: int  # latent pixels per DiT token side (1: the VAE latents are already patchified)
    text_dim: int  # width of the prompt embeddings the DiT reads


def base_layout(dit_config: DiTConfig) -> BaseLayout:
    """The layout of a FLUX.2 or Z-Image DiT config (its family's ``kv_layout``)."""
    family = _family(dit_config)
    return BaseLayout(family.name, *astuple(family.kv_layout(dit_config)))


def _family(dit_config: DiTConfig) -> Family:
    family = family_of_config(dit_config)
    if family is None:
        raise TemplateConfigError(
            f"templates are built for a Flux2DiTConfig or a ZImageDiTConfig, got {type(dit_config).__name__}"
        )
    return family


def backbone_of_names(names: Iterable[str]) -> str | None:
    """Which backbone KV block names or DiT Linear paths belong to (None when they do not tell)."""
    names = list(names)
    for family in FAMILIES.values():
        if names and all(n.startswith(family.name_prefixes) for n in names):
            return family.name
    return None


def kv_block_names(dit_config: DiTConfig) -> tuple[str, ...]:
    """Every block that takes template KV, in the cache naming of DESIGN.md 4.1."""
    return base_layout(dit_config).block_names


def attention_lora_modules(
    dit_config: DiTConfig,
    double_blocks: Iterable[int] | None = None,
    single_blocks: Iterable[int] | None = None,
) -> tuple[str, ...]:
    """DiT Linear paths of the attention projections. ``None`` selects every block.

    FLUX.2: image-stream ``to_q/to_k/to_v/to_out.0`` of the double blocks and ``attn.to_out`` of the
    single blocks (their fused QKV+MLP input is left out: it is 9x wider and would dominate a
    template's size). Z-Image: ``attention.to_q/to_k/to_v/to_out.0`` of the main blocks (pass their
    indices as ``double_blocks``; the refiners are left out, like the KV door).
    """
    return _family(dit_config).attention_modules(dit_config, double_blocks, single_blocks)


def linear_shapes(dit_config: DiTConfig, modules: Sequence[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(in_features, out_features)`` of each named DiT Linear, read off a DiT built on the meta device."""
    with meta_build():
        layers = dict(_family(dit_config).dit_class(dit_config).named_modules())
    ins, outs = [], []
    for name in modules:
        layer = layers.get(name)
        if not isinstance(layer, nn.Linear):
            linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
            what = "does not exist" if layer is None else f"is a {type(layer).__name__}, not a Linear"
            raise TemplateConfigError(
                f"DiT module {name!r} {what}; Linear paths look like {linears[:3]} ... ({len(linears)} in all)"
            )
        ins.append(layer.in_features)
        outs.append(layer.out_features)
    return tuple(ins), tuple(outs)


# --- config checks --------------------------------------------------------------------------------


def check_positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise TemplateConfigError(f"{owner}.{name} must be a positive number, got {value!r}")


def check_names(owner: str, field: str, names: Sequence[str], allow_empty: bool = False) -> tuple[str, ...]:
    """A tuple of unique non-empty strings (JSON gives lists; configs keep tuples)."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TemplateConfigError(f"{owner}.{field} must be a list of names, got {names!r}")
    names = tuple(names)
    if not names and not allow_empty:
        raise TemplateConfigError(f"{owner}.{field} is empty; give at least one name")
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TemplateConfigError(f"{owner}.{field} holds {bad!r}; every entry must be a non-empty string")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TemplateConfigError(f"{owner}.{field} lists {repeated} more than once")
    return names


def check_module_shapes(
    owner: str, modules: Sequence[str], in_features: Sequence[int], out_features: Sequence[int]
) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    """LoRA targets: names (no dots at the ends) with one positive in/out size each."""
    modules = check_names(owner, "modules", modules)
    ins, outs = tuple(int(i) for i in in_features), tuple(int(o) for o in out_features)
    if not len(modules) == len(ins) == len(outs):
        raise TemplateConfigError(
            f"{owner}: modules ({len(modules)}), in_features ({len(ins)}) and out_features ({len(outs)}) "
            "must have one entry per module; build the config with for_dit(...) to fill the sizes in"
        )
    for name, i, o in zip(modules, ins, outs):
        if name.startswith(".") or name.endswith("."):
            raise TemplateConfigError(f"{owner}: module name {name!r} must be a DiT Linear path like 'a.b.c'")
        if i <= 0 or o <= 0:
            raise TemplateConfigError(
                f"{owner}: module {name!r} has in/out features {i}/{o}; both must be positive"
            )
    return modules, ins, outs


def module_key(name: str) -> str:
    """A DiT module path as a submodule key (``nn.ModuleDict`` keys cannot hold dots)."""
    return name.replace(".", "-")


# --- tensors --------------------------------------------------------------------------------------


def sinusoidal_embedding(x: Tensor, channels: int, max_period: float = 10000.0) -> Tensor:
    """``[..., channels]`` embedding of ``x``: cosines first, then sines (DiffSynth's value encoder)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    angles = x.float()[..., None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def grid_ids(height: int, width: int, t: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Position ids ``(t, row, col, 0)`` of an ``height x width`` token grid, row-major: ``[h * w, 4]``."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest multiple of ``multiple``, at least one multiple."""
    return max(multiple, int(round(value / multiple)) * multiple)


def parameter_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def parameter_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --- folders --------------------------------------------------------------------------------------


def template_spec(model: nn.Module, name: str | None = None, **fields: Any) -> TemplateSpec:
    """A ``TemplateSpec`` for ``save_template_folder`` with this model's own input schema and cache keys.

    Zoo schemas depend on the config (value names, mask, prompt), so the instance's schema, not the
    class default, goes into ``template.json``.
    """
    schema = getattr(model, "input_schema", None)
    config = getattr(model, "config", None)
    names = getattr(config, "block_names", None) or getattr(config, "modules", None) or ()
    fields.setdefault("base_backbone", backbone_of_names(names))
    return TemplateSpec(
        architecture=model.architecture,
        name=name,
        inputs=schema.to_json() if schema is not None else None,
        cache_keys=list(model.cache_keys),
        **fields,
    )


# --- LoRA targets ---------------------------------------------------------------------------------


@dataclass
class LoRATargetsConfig:
    """DiT Linear modules a LoRA template writes, with their sizes (defaults: klein-4B attention)."""

    modules: tuple[str, ...] = field(default_factory=lambda: _klein_4b_targets()[0])
    in_features: tuple[int, ...] = field(default_factory=lambda: _klein_4b_targets()[1])
    out_features: tuple[int, ...] = field(default_factory=lambda: _klein_4b_targets()[2])
    rank: int = 4

    def __post_init__(self) -> None:
        owner = type(self).__name__
        self.modules, self.in_features, self.out_features = check_module_shapes(
            owner, self.modules, self.in_features, self.out_features
        )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise TemplateConfigError(f"{owner}.rank must be a positive integer, got {self.rank!r}")

    @classmethod
    def for_dit(cls, dit_config: DiTConfig, modules: Sequence[str] | None = None, **kwargs: Any):
        """Target ``modules`` of ``dit_config`` (default: ``attention_lora_modules``), sizes read off the DiT."""
        modules = attention_lora_modules(dit_config) if modules is None else tuple(modules)
        ins, outs = linear_shapes(dit_config, modules)
        return cls(modules=modules, in_features=ins, out_features=outs, **kwargs)

    @classmethod
    def klein_4b(cls, modules: Sequence[str] | None = None, **kwargs: Any):
        return cls.for_dit(Flux2DiTConfig.klein_4b(), modules, **kwargs)

    @classmethod
    def klein_9b(cls, modules: Sequence[str] | None = None, **kwargs: Any):
        return cls.for_dit(Flux2DiTConfig.klein_9b(), modules, **kwargs)

    @classmethod
    def z_image(cls, modules: Sequence[str] | None = None, **kwargs: Any):
        """Z-Image (Turbo and base share the DiT): attention of all 30 main blocks."""
        return cls.for_dit(ZImageDiTConfig(), modules, **kwargs)

    @classmethod
    def tiny(cls, modules: Sequence[str] | None = None, **kwargs: Any):
        """Matches ``random_flux2_pipeline()``'s DiT."""
        return cls.for_dit(tiny_dit_config(), modules, **kwargs)

    @classmethod
    def tiny_zimage(cls, modules: Sequence[str] | None = None, **kwargs: Any):
        """Matches ``random_zimage_pipeline()``'s DiT."""
        return cls.for_dit(tiny_zimage_dit_config(), modules, **kwargs)


@functools.cache
def _klein_4b_targets() -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]:
    modules = attention_lora_modules(Flux2DiTConfig.klein_4b())
    return (modules, *linear_shapes(Flux2DiTConfig.klein_4b(), modules))
