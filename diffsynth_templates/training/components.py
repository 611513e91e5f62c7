"""What a training run is made of: base-model parts, the template, its data processor, and their fingerprints.

Stage I needs the text encoder, VAE and tokenizer; stage II needs only the DiT (the text encoder and
VAE join only when validation images are requested); ``--task full`` needs everything. The model and
each component override are resolved once per run (``resolve_base``) and every loader here takes
those folders, so the trainer never repeats the rules (nor a hub download).

Fingerprints say which inputs produced a feature cache. A component folder's fingerprint hashes its
JSON files (configs, tokenizer), every safetensors header (names, dtypes, shapes) and a strided
sample of the weight bytes: cheap on multi-GB checkpoints (at most 16 MiB read per file), yet a
retrained model with the same shapes changes it. Files up to 16 MiB are hashed whole.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import logging
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DiffSynthTemplatesError
from ..loading import CheckpointError
from ..loading.integrity import SHA256_KEY
from ..loading.json_io import to_json_value
from ..loading.resolve import ModelNotFoundError, resolve_model_path
from ..pipelines.auto import BACKBONE_TITLES
from ..pipelines.common import COMPONENTS, ComponentFolders, component_folders
from ..pipelines.families import family_of_folder
from ..pipelines.memory import load_stored
from ..pipelines.single_file import load_family_dit
from ..templates import TemplateSpec, build_architecture, load_template_folder
from ..templates.folder import fingerprint_callable
from ..templates.processors import get_processor
from ..templates.zoo._common import backbone_of_names
from .backbones import TrainingBackbone, get_backbone
from .config import TrainConfig

logger = logging.getLogger(__name__)

FEATURE_COMPONENTS = ("text_encoder", "vae", "tokenizer")  # what stage-I features depend on
_BLOCK = 1 << 20
_BLOCKS = 16


class TemplateSetupError(DiffSynthTemplatesError, ValueError):
    """The template, its architecture or its data processor cannot be used for training."""


def import_user_modules(config: TrainConfig) -> None:
    """``--import_modules``: modules that register custom architectures or data processors."""
    for name in config.import_modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise TemplateSetupError(
                f"--import_modules: cannot import {name!r} ({e}); is it on PYTHONPATH?"
            ) from e


def model_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype of frozen weights and of stored features."""
    return torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32


# --------------------------------------------------------------------------------------------------
# base model
# --------------------------------------------------------------------------------------------------


def resolve_base(config: TrainConfig) -> ComponentFolders:
    """``--model`` and each ``--{component}`` override, each resolved once for the whole run: the
    entry points (stage I, stage II, full) call this and pass the folders down."""
    if config.model is None:
        if config.transformer is None:
            raise ModelNotFoundError(
                "no base model given: pass --model (or --transformer), it decides the backbone"
            )
        missing = [name for name in COMPONENTS if getattr(config, name) is None]
        if missing:
            raise ModelNotFoundError(f"no {missing[0]} given: pass --model (or --{missing[0]})")
    overrides = {name: getattr(config, name) for name in COMPONENTS}
    return component_folders(config.model, overrides, None, None, True if config.offline else None)


def folder_fingerprint(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        try:
            if path.suffix == ".json":
                digest.update(path.relative_to(folder).as_posix().encode())
                digest.update(path.read_bytes())
            elif path.suffix == ".safetensors":
                digest.update(path.relative_to(folder).as_posix().encode())
                digest.update(_safetensors_digest(path))
        except OSError as e:
            raise CheckpointError(f"cannot read {str(path)!r} to fingerprint it: {e.strerror or e}") from e
    return digest.hexdigest()


def _safetensors_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        digest.update(f.read(header_len))
        start, length = 8 + header_len, size - 8 - header_len
        if length <= _BLOCK * _BLOCKS:
            digest.update(f.read())
        else:  # evenly spaced blocks, the first at the start of the data and the last at its end
            for i in range(_BLOCKS):
                f.seek(start + i * (length - _BLOCK) // (_BLOCKS - 1))
                digest.update(f.read(_BLOCK))
    return digest.digest()


def base_model_fingerprint(config: TrainConfig, folders: ComponentFolders | None = None) -> dict[str, str]:
    """Fingerprints of the parts stage-I features depend on (the DiT is not one of them)."""
    folders = folders or resolve_base(config)
    return {name: folder_fingerprint(folders[name]) for name in FEATURE_COMPONENTS}


def training_backbone(config: TrainConfig, folders: ComponentFolders | None = None) -> TrainingBackbone:
    """FLUX.2-klein or Z-Image: read from the DiT's folder (``--transformer``, else ``--model``)."""
    folders = folders or resolve_base(config)
    try:
        return get_backbone(family_of_folder(folders["transformer"]).name)
    except ValueError as e:
        raise TemplateSetupError(f"cannot train on {config.transformer or config.model}: {e}") from e


def load_dit(
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    backbone: TrainingBackbone | None = None,
    folders: ComponentFolders | None = None,
) -> nn.Module:
    folders = folders or resolve_base(config)
    backbone = backbone or training_backbone(config, folders)

    def load(at: torch.device) -> nn.Module:
        if folders.single_files.get("transformer"):  # --transformer FILE.safetensors
            return load_family_dit(backbone.family, folders, dtype, at)
        return backbone.load_dit(folders["transformer"], at, dtype)

    # --base_weight_dtype: converted on the host, so the device never holds the frozen DiT's wide copy
    return load_stored(load, device, config.base_weight_dtype)


def load_pipeline(
    config: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    dit: nn.Module | None = None,
    backbone: TrainingBackbone | None = None,
    folders: ComponentFolders | None = None,
):
    """Text encoder + VAE + tokenizer as the backbone's pipeline; ``dit`` may be None (stage I never runs it)."""
    folders = folders or resolve_base(config)
    backbone = backbone or training_backbone(config, folders)
    return backbone.load_pipeline(config, folders, device, dtype, dit)


# --------------------------------------------------------------------------------------------------
# template and data processor
# --------------------------------------------------------------------------------------------------


@dataclass
class TemplateHandle:
    model: nn.Module
    spec: TemplateSpec  # written into every checkpoint's template.json
    processor: Any  # (row, image, seed) -> template inputs; None passes row["template_inputs"] through
    fingerprint: dict[str, Any]  # {"architecture", "config", "data_processor"}


def _check_backbone(config: TrainConfig, spec: TemplateSpec, model_config: Any, backbone: str) -> None:
    """The template's declared base (its folder) or its block/module names must match the base model."""
    names = list(getattr(model_config, "block_names", None) or getattr(model_config, "modules", None) or ())
    declared, named = spec.base_backbone, backbone_of_names(names)
    built_for = declared or named
    if built_for is None or built_for == backbone:
        return
    title = BACKBONE_TITLES.get
    if declared:
        what = f"--template {config.template} was built for {title(declared, declared)} (base model {spec.base_model!r})"
        fix = f"start from a template made for {title(backbone, backbone)}, or pass --architecture"
    else:
        what = f"--architecture {spec.architecture} names blocks of a {title(named, named)} DiT ({', '.join(names[:3])}, ...)"
        example = "tiny_zimage()/z_image()" if backbone == "zimage" else "tiny()/klein_4b()"
        fix = f"give --architecture_config the block names of this DiT (e.g. the zoo configs' {example})"
    raise TemplateSetupError(
        f"{what}, but the base model {config.transformer or config.model!r} is "
        f"{title(backbone, backbone)}: {fix}"
    )


def build_template(config: TrainConfig, seed: int, backbone: str | None = None) -> TemplateHandle:
    """The template to train, in float32 (trainable weights are kept in full precision).

    ``backbone`` ("flux2" / "zimage", the base model's) is written into the spec as ``base_backbone``;
    a template whose folder or block names say it was built for the other one is refused.
    """
    if config.architecture:
        torch.manual_seed(seed)  # same initial weights on every rank and every rerun
        model = build_architecture(config.architecture, config.architecture_config)
        spec = TemplateSpec(architecture=config.architecture, name=config.template_name)
        spec.cache_keys = list(getattr(model, "cache_keys", ()))
        schema = getattr(model, "input_schema", None)
        if schema is not None and hasattr(schema, "to_json"):
            spec.inputs = schema.to_json()
        declared = None
    else:
        folder = resolve_model_path(config.template, offline=True if config.offline else None)
        try:
            loaded = load_template_folder(folder, torch_dtype=torch.float32)
        except Exception as e:
            raise TemplateSetupError(f"cannot load --template {config.template}: {e}") from e
        if loaded.kind != "declarative" or loaded.spec is None:
            raise TemplateSetupError(
                f"--template {config.template} is a DiffSynth-format folder (model.py); training writes the "
                "declarative format, so start from a declarative folder or pass --architecture NAME"
            )
        model, spec = loaded.model, copy.deepcopy(loaded.spec)
        # the start's digests: checkpoints hold other weights, and a stale digest fails their loading
        spec.extra.pop(SHA256_KEY, None)
        if config.template_name:
            spec.name = config.template_name
        declared = spec.data_processor
    model_config = getattr(model, "config", None)
    if backbone is not None:
        _check_backbone(config, spec, model_config, backbone)
        spec.base_backbone = backbone  # TemplatePipeline refuses it on another backbone
    spec.base_model = spec.base_model or config.model  # what it was trained on, for model cards
    spec.config = to_json_value(asdict(model_config)) if is_dataclass(model_config) else dict(spec.config)

    if config.data_processor:
        try:
            processor = get_processor(config.data_processor, **config.data_processor_config)
        except (KeyError, TypeError, ValueError) as e:
            raise TemplateSetupError(f"--data_processor {config.data_processor}: {e}") from e
        spec.data_processor = {"name": config.data_processor, "config": config.data_processor_config}
    elif declared:
        processor = get_processor(declared["name"], **declared.get("config", {}))
    else:
        processor = None
        logger.info("no data processor: the template gets each row's template_inputs as they are")
    fingerprint = {
        "architecture": spec.architecture,
        "config": spec.config,
        "data_processor": fingerprint_callable(processor),
    }
    return TemplateHandle(model.float(), spec, processor, fingerprint)
