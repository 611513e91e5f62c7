"""The trainer's configuration: one dataclass, filled from command-line flags and an optional YAML/JSON file.

``--config FILE`` gives defaults for any field (keys are the flag names without dashes); flags given
on the command line override it. Everything is validated once, up front, so a bad argument fails in
the first second with a message that says what to pass instead, never an hour into a run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import DiffSynthTemplatesError

TASKS = ("data_process", "train", "full")
TRAINABLE = ("template", "dit", "dit_lora")
SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("no", "bf16")
BASE_WEIGHT_DTYPES = ("float8_e4m3fn", "float8_e5m2")  # --base_weight_dtype (loading.quantize.FP8_FORMATS)
CONDITION_SIZES = ("target", "original")
TEMPLATE_INITS = ("dit", "random")
CONDITION_DROPOUTS = ("caption_dropout", "unaligned_prompt", "template_dropout")
LORA_EXPORT_FORMATS = ("comfyui", "diffusers")  # pipelines.lora_files.EXPORT_FORMATS
# Linear layers of the FLUX.2 DiT that get a LoRA by default (suffixes of module paths); the same set
# DiffSynth-Studio trains for klein: attention projections and both MLPs of every block. On Z-Image
# they match the attention projections (to_q, to_k, to_v, to_out.0) of every block.
# seeds reach torch.manual_seed, numpy and int64 tensors: non-negative and within int64
MAX_SEED = 2**63 - 1
# keys a file may never set: running a folder's code is allowed only from the command line or Python
TRUST_KEYS = ("trust_remote_code",)
DEFAULT_LORA_TARGETS = (
    "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,"
    "linear_in,linear_out,to_qkv_mlp_proj,attn.to_out"
)


class ConfigError(DiffSynthTemplatesError, ValueError):
    """A training argument is missing, malformed or contradicts another one."""


@dataclass
class TrainConfig:
    task: str = "train"

    # data
    dataset_base_path: str | None = None
    dataset_metadata_path: str | None = None
    max_pixels: int = 1024 * 1024
    condition_size: str = "target"  # template-input and edit images: cover-cropped to the target, or native
    max_sequence_length: int = 512
    dataset_num_workers: int = 0
    cache_path: str | None = None  # stage I output, stage II input
    shared_feature_cache: str | None = None  # content store shared by several caches (text, latents)
    cache_chunk_size: int = 64  # samples per committed shard: the most a killed stage I loses
    # condition dropout (ControlNet-style training for controls that win over the prompt): shares of the
    # samples, each drawn from the sample's own seed, so stage I and --task full make the same choices
    caption_dropout: float = 0.0  # the prompt is replaced by ""
    unaligned_prompt: float = 0.0  # the prompt is the row's --unaligned_prompt_field instead
    unaligned_prompt_field: str = "prompt_unaligned"
    template_dropout: float = 0.0  # the template's input images are replaced by black ones

    # base model
    model: str | None = None
    transformer: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    offline: bool = False
    base_weight_dtype: str | None = None  # stage II's frozen DiT stored in FP8 (loading.quantize)

    # template
    template: str | None = None  # a declarative template folder (or ModelScope id) to start from
    architecture: str | None = None  # ...or a fresh one of this registered architecture
    architecture_config: dict[str, Any] = field(default_factory=dict)
    data_processor: str | None = None  # registered processor name (default: the template's own)
    data_processor_config: dict[str, Any] = field(default_factory=dict)
    template_name: str | None = None  # name written into checkpoints' template.json
    template_init: str = "dit"  # a fresh --architecture: copy the base DiT's weights where it can, or random
    import_modules: list[str] = field(default_factory=list)  # register custom architectures/processors

    # what to train
    trainable_models: list[str] = field(default_factory=lambda: ["template"])
    lora_rank: int = 32
    lora_alpha: float | None = None  # default: lora_rank (scale 1)
    lora_target_modules: list[str] = field(default_factory=lambda: DEFAULT_LORA_TARGETS.split(","))
    lora_export_format: str | None = None  # also write dit_lora_{format}.safetensors: comfyui | diffusers

    # optimization
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    num_epochs: int | None = None
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"
    mixed_precision: str = "no"
    use_gradient_checkpointing: bool = False
    gradient_checkpointing_offload: bool = False
    find_unused_parameters: bool = False
    seed: int = 0

    # output
    output_path: str | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    validation_steps: int | None = None
    validation_inputs: list[dict[str, Any]] | None = None
    log_steps: int = 1
    resume: str | None = None  # a checkpoint folder, or "auto": the latest one under output_path

    @property
    def trains_template(self) -> bool:
        return "template" in self.trainable_models

    @property
    def uses_template(self) -> bool:
        return self.template is not None or self.architecture is not None

    def condition_dropout(self) -> dict[str, Any]:
        """The condition-dropout settings that are on (``{}`` when none is): the dataset's keyword
        arguments and part of the feature cache's fingerprint (caches made without them stay valid)."""
        on = {name: getattr(self, name) for name in CONDITION_DROPOUTS if getattr(self, name) > 0}
        if self.unaligned_prompt > 0:
            on["unaligned_prompt_field"] = self.unaligned_prompt_field
        return on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "the configuration") -> TrainConfig:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{where} has unknown keys {unknown}; valid keys are {sorted(known)}")
        kwargs = {name: _normalize(name, value) for name, value in values.items() if value is not None}
        config = cls(**kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        self._check_types()
        _choice("task", self.task, TASKS)
        _choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _choice("mixed_precision", self.mixed_precision, PRECISIONS)
        _choice("condition_size", self.condition_size, CONDITION_SIZES)
        _choice("template_init", self.template_init, TEMPLATE_INITS)
        if self.lora_export_format is not None:
            _choice("lora_export_format", self.lora_export_format, LORA_EXPORT_FORMATS)
            if "dit_lora" not in self.trainable_models:
                raise ConfigError(
                    "--lora_export_format exports a trained DiT LoRA: add dit_lora to --trainable_models"
                )
        for name in ("max_pixels", "max_sequence_length", "batch_size", "gradient_accumulation_steps"):
            _positive(name, getattr(self, name))
        for name in ("cache_chunk_size", "lora_rank", "log_steps"):
            _positive(name, getattr(self, name))
        for name in ("num_epochs", "max_steps", "save_steps", "save_total_limit", "validation_steps"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("dataset_num_workers", "warmup_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        self._validate_condition_dropout()
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.max_grad_norm == 0:  # 0 turns clipping off (the default clips at 1.0)
            self.max_grad_norm = None
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"--max_grad_norm must be > 0, or 0 for no clipping; got {self.max_grad_norm}")

        self._validate_models()
        self._validate_base_weight_dtype()
        needs_dataset = self.task in ("data_process", "full")
        if needs_dataset and not self.dataset_metadata_path:
            raise ConfigError(
                f"--task {self.task} reads the dataset: pass --dataset_metadata_path (and --dataset_base_path)"
            )
        if self.model is None and not (self.transformer or self.text_encoder or self.vae):
            raise ConfigError(
                "pass --model: the base model folder or ModelScope id (official FLUX.2-klein or Z-Image layout)"
            )
        if self.task in ("data_process", "train") and not self.cache_path:
            what = (
                "write the feature cache to" if self.task == "data_process" else "read stage-I features from"
            )
            raise ConfigError(f"--task {self.task} needs --cache_path: the folder to {what}")
        if self.task in ("train", "full"):
            if not self.output_path:
                raise ConfigError(f"--task {self.task} needs --output_path: where checkpoints and logs go")
            if self.num_epochs is None and self.max_steps is None:
                raise ConfigError(
                    "say how long to train: pass --num_epochs or --max_steps (or both; max_steps caps)"
                )
        if (self.validation_steps is None) != (self.validation_inputs is None):
            raise ConfigError("--validation_steps and --validation_inputs go together; pass both or neither")
        if self.validation_inputs is not None:
            _check_validation_inputs(self.validation_inputs)
        if self.resume is not None and self.task == "data_process":
            raise ConfigError("--resume is for training; a rerun of --task data_process resumes by itself")

    def _check_types(self) -> None:
        """Each field holds its declared type (a config file can hold anything); floats are finite."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if value is None and kind.endswith("| None"):
                continue
            kind = kind.replace(" | None", "")
            if f.name == "seed":
                check_seed(value)
            elif kind == "float":
                check_finite_flag(f.name, value)
            elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"--{f.name} must be an integer, got {value!r} ({type(value).__name__})")
            elif kind in ("str", "bool") and not isinstance(value, {"str": str, "bool": bool}[kind]):
                raise ConfigError(f"--{f.name} must be a {kind}, got {value!r} ({type(value).__name__})")

    def _validate_base_weight_dtype(self) -> None:
        if self.base_weight_dtype is None:
            return
        _choice("base_weight_dtype", self.base_weight_dtype, BASE_WEIGHT_DTYPES)
        if "dit" in self.trainable_models:
            raise ConfigError(
                f"--base_weight_dtype {self.base_weight_dtype} stores the frozen DiT compactly, but "
                "--trainable_models has dit (full fine-tuning trains those weights): drop one of them "
                "(dit_lora works with it)"
            )

    def _validate_condition_dropout(self) -> None:
        for name in CONDITION_DROPOUTS:
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(
                    f"--{name} is a share of the samples, from 0 to 1; got {getattr(self, name)}"
                )
        if self.caption_dropout + self.unaligned_prompt > 1:
            raise ConfigError(
                f"--caption_dropout {self.caption_dropout} + --unaligned_prompt {self.unaligned_prompt} is "
                "over 1: a sample gets one prompt (empty, unaligned or its own); lower one of them"
            )
        if self.template_dropout > 0 and not self.uses_template:
            raise ConfigError(
                "--template_dropout drops a template's inputs: pass --template or --architecture"
            )
        if not self.unaligned_prompt_field.strip():
            raise ConfigError("--unaligned_prompt_field must name a metadata column, e.g. prompt_unaligned")

    def _validate_models(self) -> None:
        models = self.trainable_models
        if not models:
            raise ConfigError(f"--trainable_models is empty; choose from {list(TRAINABLE)}")
        bad = [m for m in models if m not in TRAINABLE]
        if bad:
            raise ConfigError(
                f"--trainable_models {bad} unknown; choose from {list(TRAINABLE)} (e.g. template,dit_lora)"
            )
        if len(set(models)) != len(models):
            raise ConfigError(f"--trainable_models lists a model twice: {models}")
        if "dit" in models and len(models) > 1:
            raise ConfigError("--trainable_models dit (full fine-tuning) cannot be combined with others; "
                              "use template,dit_lora to train a template together with a DiT LoRA")  # fmt: skip
        if self.template and self.architecture:
            raise ConfigError(
                "pass --template (a folder to start from) or --architecture (a fresh model), not both"
            )
        if self.architecture_config and not self.architecture:
            raise ConfigError(
                "--architecture_config configures a fresh --architecture; a --template folder has its own"
            )
        if self.trains_template and not self.uses_template:
            raise ConfigError(
                "--trainable_models template needs a template: pass --template FOLDER or --architecture NAME"
            )
        if not self.trains_template and self.uses_template and "dit" in models:
            raise ConfigError(
                "--trainable_models dit trains the base model alone; drop --template/--architecture"
            )
        if self.data_processor_config and not self.data_processor:
            raise ConfigError("--data_processor_config needs --data_processor NAME")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"--lora_alpha must be > 0, got {self.lora_alpha}")


def check_finite_flag(name: str, value: Any) -> float:
    """A float hyper-parameter: a real, finite number (NaN or inf would poison every weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"--{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value!r}")
    return float(value)


def check_seed(value: Any) -> int:
    """``--seed``: an integer in 0 .. 2**63-1 (what torch, numpy and the per-sample seeds accept)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise ConfigError(f"--seed must be an integer from 0 to 2**63-1 ({MAX_SEED}), got {value!r}")
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {list(choices)}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a positive integer, got {value!r}")


def _check_validation_inputs(items: Any) -> None:
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        raise ConfigError("--validation_inputs must be a non-empty JSON list of objects like "
                          '[{"prompt": "a cat", "template_inputs": {"scale": 0.7}, "seed": 0}]')  # fmt: skip
    for i, item in enumerate(items):
        if not isinstance(item.get("prompt"), str):
            raise ConfigError(f"--validation_inputs[{i}] needs a 'prompt' string, got {item.get('prompt')!r}")


def _comma_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    raise ConfigError(f"expected a comma-separated string or a list, got {value!r}")


def _json_value(name: str, value: Any, expected: type) -> Any:
    """A JSON argument given inline, as a path to a .json file, or already parsed (from a config file)."""
    if isinstance(value, str):
        if not value.lstrip().startswith(("{", "[")) and Path(value).is_file():
            value = read_data_file(value, f"--{name}", yaml_allowed=False)
        else:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"--{name} is not valid JSON ({e.msg} at column {e.colno}): {value[:80]!r}"
                ) from None
    if not isinstance(value, expected):
        raise ConfigError(f"--{name} must be a JSON {expected.__name__}, got {type(value).__name__}")
    return value


def _number(name: str, value: Any, kind: type) -> Any:
    """A number given as text (YAML reads ``1e-4`` as a string; ``--seed`` stays text for its own message)."""
    if not isinstance(value, str):
        return value
    try:
        return kind(value.strip())
    except ValueError:
        if name == "seed":
            check_seed(value)
        raise ConfigError(
            f"--{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from None


_FLOATS = ("learning_rate", "weight_decay", "max_grad_norm", "lora_alpha", *CONDITION_DROPOUTS)


def _normalize(name: str, value: Any) -> Any:
    if name == "seed":
        return _number(name, value, int)
    if name in _FLOATS:
        return _number(name, value, float)
    if name in ("trainable_models", "lora_target_modules", "import_modules"):
        return _comma_list(value)
    if name in ("architecture_config", "data_processor_config"):
        return _json_value(name, value, dict)
    if name == "validation_inputs":
        return _json_value(name, value, list)
    return value


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

_HELP = {
    "task": "data_process: stage I, features to --cache_path; train: stage II from the cache; full: both in one run, features in memory",
    "dataset_base_path": "folder that relative paths in the metadata resolve against (default: the metadata's folder)",
    "dataset_metadata_path": "metadata.json / .jsonl / .csv with image, prompt, optional edit_image and template_inputs",
    "max_pixels": "pixel budget per training image (images are bucketed by aspect ratio)",
    "condition_size": "target (default): images in template_inputs and edit_image are cover-cropped to the "
    "training image's size, so aligned maps (depth, edges, masks) stay aligned; original: their own size "
    "(e.g. the low-resolution input of super-resolution)",
    "caption_dropout": "share of the samples (0 to 1) trained with an empty prompt, so a template must carry "
    "the image alone (ControlNet drops half); drawn from each sample's seed",
    "unaligned_prompt": "share of the samples (0 to 1) whose prompt is the row's --unaligned_prompt_field: a "
    "caption that does not describe the control's layout, so the template learns to win over the prompt",
    "unaligned_prompt_field": "metadata column holding the unaligned prompt of each row",
    "template_dropout": "share of the samples (0 to 1) whose template-input images are replaced by black "
    "ones: the template learns the unconditional case (templates without image inputs cannot drop)",
    "max_sequence_length": "prompt tokens (padded/truncated)",
    "dataset_num_workers": "DataLoader worker processes",
    "cache_path": "feature cache folder (stage I writes it, stage II reads it)",
    "shared_feature_cache": "content store for text embeddings and latents shared by several caches (default: inside --cache_path)",
    "cache_chunk_size": "samples per committed cache shard (a killed stage I redoes at most this many per rank)",
    "model": "base model folder or ModelScope id in the official layout (transformer/, text_encoder/, vae/, "
    "tokenizer/): FLUX.2-klein or Z-Image, told apart by its model_index.json / transformer config",
    "transformer": "take the DiT from this folder or id instead, or from one .safetensors file (BFL/ComfyUI "
    "layout, fp8-scaled too; its config from --model's transformer/config.json)",
    "text_encoder": "take the text encoder from this folder or id instead",
    "vae": "take the VAE from this folder or id instead",
    "tokenizer": "take the tokenizer from this folder or id instead",
    "offline": "never touch the network; use only cached downloads",
    "base_weight_dtype": "store the frozen DiT's large Linear weights in this format (float8_e4m3fn: about "
    "half the bf16 bytes) while the template (and a dit_lora) train in full precision",
    "template": "declarative template folder (or ModelScope id) to start from",
    "architecture": "build a fresh template of this registered architecture instead",
    "architecture_config": "JSON object (inline or a .json file) configuring --architecture",
    "data_processor": "registered data processor turning a dataset row into template inputs (default: the template's own)",
    "data_processor_config": "JSON object of options for --data_processor",
    "template_name": "name recorded in the checkpoints' template.json",
    "template_init": "how a fresh --architecture template starts: dit (default; architectures with init_from_dit, "
    "e.g. image_kv and inpaint, copy the base DiT's weights where names and shapes match) or random",
    "import_modules": "comma-separated Python modules to import first (to register custom architectures or processors)",
    "trainable_models": "comma-separated: template (default), dit (full fine-tuning, no template), dit_lora; e.g. template,dit_lora",
    "lora_rank": "rank of the DiT LoRA (dit_lora)",
    "lora_alpha": "LoRA alpha (default: the rank, i.e. scale 1)",
    "lora_target_modules": "comma-separated suffixes of the DiT Linear layers that get a LoRA",
    "lora_export_format": "also write each checkpoint's DiT LoRA as dit_lora_{format}.safetensors: comfyui "
    "(BFL names, diffusion_model. prefix: ComfyUI, ai-toolkit, diffusers) or diffusers (transformer. prefix)",
    "learning_rate": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay",
    "num_epochs": "passes over the dataset",
    "max_steps": "optimizer steps (caps --num_epochs when both are given)",
    "batch_size": "samples per micro-batch per process (a batch shares one resolution bucket)",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "max_grad_norm": "clip the global gradient norm to this (0: no clipping)",
    "warmup_steps": "linear warmup from 0 to --learning_rate",
    "lr_scheduler": "after warmup: constant, cosine (to 0) or linear (to 0)",
    "mixed_precision": "bf16: frozen weights and features in bf16, autocast, trainable weights in fp32",
    "use_gradient_checkpointing": "recompute DiT blocks in the backward pass instead of storing activations",
    "gradient_checkpointing_offload": "keep saved activations in host memory (torch.autograd.graph.save_on_cpu)",
    "find_unused_parameters": "DDP: allow trainable parameters that a step does not use (e.g. a LoRA bank)",
    "seed": "seeds data order, per-sample processing, noise and timesteps",
    "output_path": "folder for checkpoints, logs and validation images",
    "save_steps": "write a checkpoint every N optimizer steps (one is always written at the end)",
    "save_total_limit": "keep only the newest N checkpoints",
    "validation_steps": "render --validation_inputs every N steps",
    "validation_inputs": 'JSON list (inline or a .json file): [{"prompt": ..., "template_inputs": {...}, "seed": 0, "height": 512, "width": 512}]',
    "log_steps": "write loss and learning rate every N steps",
    "resume": "continue from a checkpoint folder, or 'auto' for the newest under --output_path",
}
_FLAGS = {"offline", "use_gradient_checkpointing", "gradient_checkpointing_offload", "find_unused_parameters"}


CHOICES = {"task": TASKS, "lr_scheduler": SCHEDULERS, "mixed_precision": PRECISIONS,
           "lora_export_format": LORA_EXPORT_FORMATS, "base_weight_dtype": BASE_WEIGHT_DTYPES}  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``ConfigError`` (train.py reports it like any other bad argument)."""

    def error(self, message: str):
        raise ConfigError(f"{message} (python train.py --help lists every flag)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="train.py",
        description="Train Diffusion Templates (and DiTs) in two stages: features, then optimization. "
        "The base model may be FLUX.2-klein or Z-Image: the backbone is read from --model's folder.",
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file of defaults for any flag below")
    types = {"int": int, "float": float}
    for f in fields(TrainConfig):
        help_text = _HELP.get(f.name, "")
        if f.name in _FLAGS:
            parser.add_argument(f"--{f.name}", action="store_true", default=None, help=help_text)
            continue
        kind = str(f.type).replace(" | None", "")
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        shown = ",".join(default) if isinstance(default, list) else default
        parser.add_argument(
            f"--{f.name}",
            type=str if f.name == "seed" else types.get(kind, str),  # seed: checked with its range later
            default=None,
            choices=CHOICES.get(f.name),
            help=f"{help_text} (default: {shown})" if shown not in (None, "", {}) else help_text,
        )
    return parser


def read_data_file(path: str | os.PathLike, what: str, yaml_allowed: bool = True) -> Any:
    """Parse a JSON (or YAML) file given by an argument: the one way a file's values enter a config.

    Every value read from a file passes ``reject_trust_keys``: a file may never switch on running code.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from e
    if yaml_allowed and path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} {path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    reject_trust_keys(data, f"{what} {path}")
    return data


def reject_trust_keys(data: Any, where: str) -> None:
    """Raise ``ConfigError`` if a mapping anywhere in ``data`` (read from a file) sets ``trust_remote_code``."""
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and key.lstrip("-").replace("-", "_") in TRUST_KEYS:
                raise ConfigError(
                    f"{where} sets {key!r}: running a folder's code can only be allowed on the command line "
                    "(--trust_remote_code, where the command has it) or as a Python argument, never from a "
                    "file; remove the key"
                )
            reject_trust_keys(value, where)
    elif isinstance(data, list):
        for value in data:
            reject_trust_keys(value, where)


# flags that run code (like trust_remote_code): a config file may not set them
COMMAND_LINE_ONLY = ("import_modules",)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    data = read_data_file(path, "--config")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {path} must hold a mapping of flag names to values, got {type(data).__name__}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"--config {path}: keys must be flag names, got {bad}")
    values = {k.lstrip("-").replace("-", "_"): v for k, v in data.items()}
    for key in COMMAND_LINE_ONLY:
        if key in values:
            raise ConfigError(
                f"--config {path} sets {key!r}: importing modules runs their code, so --{key} is accepted only "
                "on the command line, never from a file; remove the key and pass the flag"
            )
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags over ``--config`` file values over the dataclass defaults."""
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config")
    values = read_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig.from_dict(values, where=f"--config {config_file}" if config_file else "the arguments")
