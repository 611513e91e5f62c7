"""Template folders for tests: a DiffSynth-format ``model.py`` and small declarative architectures."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from diffsynth_templates.templates import (
    InputField,
    InputSchema,
    TemplateModel,
    TemplateSpec,
    register_architecture,
)
from diffsynth_templates.templates.folder import save_template_folder

# A template written the way DiffSynth-Studio's brightness example is: a scalar -> per-block KV.
DIFFSYNTH_MODEL_PY = """
import math
import torch

LOADS = []  # how many times this code ran (the test reads it through the module cache)


class ScalarEncoder(torch.nn.Module):
    def __init__(self, dim_out, length):
        super().__init__()
        self.length = length
        self.embedder = torch.nn.Sequential(torch.nn.Linear(16, dim_out), torch.nn.SiLU(), torch.nn.Linear(dim_out, dim_out))
        self.positional_embedding = torch.nn.Parameter(torch.randn(length, dim_out))

    def forward(self, value):
        freqs = torch.exp(-math.log(10000) * torch.arange(8, dtype=torch.float32) / 8).to(value.device)
        angles = value[:, None].float() * 1000 * freqs[None]
        emb = torch.cat([angles.cos(), angles.sin()], -1).to(value.dtype)
        return self.embedder(emb).squeeze(0).expand(self.length, -1) + self.positional_embedding


class ScalarKVModel(torch.nn.Module):
    def __init__(self, block_names, dim, num_heads, length):
        super().__init__()
        LOADS.append(1)
        self.block_names = list(block_names)
        self.proj_k = torch.nn.ModuleDict({b: ScalarEncoder(dim, length) for b in self.block_names})
        self.proj_v = torch.nn.ModuleDict({b: ScalarEncoder(dim, length) for b in self.block_names})
        self.num_heads, self.length = num_heads, length

    @torch.no_grad()
    def process_inputs(self, pipe, scale, **kwargs):
        return {"value": torch.tensor([scale], dtype=pipe.torch_dtype, device=pipe.device)}

    def forward(self, value, **kwargs):
        kv = {}
        for b in self.block_names:
            k = self.proj_k[b](value).view(1, self.length, self.num_heads, -1)
            v = self.proj_v[b](value).view(1, self.length, self.num_heads, -1)
            kv[b] = (k, v)
        return {"kv_cache": kv}


TEMPLATE_MODEL = ScalarKVModel
TEMPLATE_MODEL_CONFIG = CONFIG_PLACEHOLDER
TEMPLATE_MODEL_PATH = "model.safetensors"
"""


def write_diffsynth_folder(folder: Path, dit, length: int = 4, seed: int = 0, blocks=None) -> Path:
    """Write model.py + model.safetensors; returns the folder. Weights are seeded random."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dit.config
    blocks = blocks or list(dit.kv_block_specs)
    config = {"block_names": blocks, "dim": cfg.hidden_size, "num_heads": cfg.num_heads, "length": length}
    (folder / "model.py").write_text(DIFFSYNTH_MODEL_PY.replace("CONFIG_PLACEHOLDER", repr(config)))
    namespace: dict = {}
    exec(
        compile(DIFFSYNTH_MODEL_PY.replace("CONFIG_PLACEHOLDER", repr(config)), "model.py", "exec"), namespace
    )
    torch.manual_seed(seed)
    model = namespace["ScalarKVModel"](**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


# --- declarative test architectures ---------------------------------------------------------------


@dataclass
class ScalarKVConfig:
    block_names: tuple[str, ...] = ("single_0",)
    heads: int = 2
    head_dim: int = 16
    length: int = 4

    def __post_init__(self):
        self.block_names = tuple(self.block_names)


@register_architecture("test_scalar_kv")
class ScalarKV(TemplateModel):
    """scale -> per-block KV of ``length`` tokens (a tiny value_kv for framework tests)."""

    config_class = ScalarKVConfig
    input_schema = InputSchema(
        [InputField("scale", "float", minimum=0.0, maximum=1.0, description="strength")]
    )
    cache_keys = ("kv_cache",)

    def __init__(self, config: ScalarKVConfig):
        super().__init__()
        self.config = config
        width = config.length * config.heads * config.head_dim
        self.proj = nn.ModuleDict({b: nn.Linear(8, 2 * width) for b in config.block_names})

    @torch.no_grad()
    def process_inputs(self, pipe=None, scale: float = 0.5, **kwargs):
        angles = torch.tensor([scale * 1000.0]) * torch.exp(-math.log(1e4) * torch.arange(4) / 4)
        return {"emb": torch.cat([angles.cos(), angles.sin()])[None]}

    def forward(self, pipe=None, emb=None, **kwargs):
        c = self.config
        kv = {}
        for b, proj in self.proj.items():
            k, v = proj(emb.to(proj.weight.dtype)).view(1, c.length, 2, c.heads, c.head_dim).unbind(2)
            kv[b] = (k, v)
        return {"kv_cache": kv}


@dataclass
class ConstantLoRAConfig:
    module: str = "single_transformer_blocks.0.attn.to_out"
    in_features: int = 32
    out_features: int = 32
    rank: int = 2
    zero_b: bool = False


@register_architecture("test_constant_lora")
class ConstantLoRA(TemplateModel):
    """Emits a fixed LoRA (scaled by an input) for one DiT Linear."""

    config_class = ConstantLoRAConfig
    input_schema = InputSchema([InputField("gain", "float", required=False, default=1.0)])
    cache_keys = ("lora",)

    def __init__(self, config: ConstantLoRAConfig):
        super().__init__()
        self.config = config
        self.a = nn.Parameter(torch.randn(config.rank, config.in_features))
        self.b = nn.Parameter(
            torch.zeros(config.out_features, config.rank)
            if config.zero_b
            else torch.randn(config.out_features, config.rank)
        )

    def forward(self, pipe=None, gain: float = 1.0, **kwargs):
        m = self.config.module
        return {"lora": {f"{m}.lora_A.weight": self.a * gain, f"{m}.lora_B.weight": self.b}}


@dataclass
class EmitConfig:
    key: str = "input_image"


@register_architecture("test_emit")
class Emit(TemplateModel):
    """Emits ``{key: value}`` verbatim (for conflict and routing tests)."""

    config_class = EmitConfig

    def __init__(self, config: EmitConfig):
        super().__init__()
        self.config = config
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, pipe=None, value=None, **kwargs):
        return {self.config.key: value}


def save_declarative(folder: Path, model: TemplateModel, name: str | None = None) -> Path:
    spec = TemplateSpec(architecture=model.architecture, name=name, cache_keys=list(model.cache_keys))
    return save_template_folder(folder, model, spec)


def ordinary_merge(tp, pipe, positive, negative=(), cfg_scale: float = 1.0) -> dict:
    """The ordinary merge (``merge_kv_caches`` per CFG side) of what ``tp``'s templates produce for these
    inputs, as pipeline arguments: the reference the stage's streamed, reused-memory merge must equal."""
    from diffsynth_templates.templates.pipeline import _merge_side

    pos, neg = tp.run_templates(pipe, positive, negative if cfg_scale != 1.0 else ())
    merged = {}
    for prefix, outputs in (("", pos), ("negative_", neg)):
        for key, value in (_merge_side(outputs) if outputs else {}).items():
            merged[prefix + key] = value
    return merged
