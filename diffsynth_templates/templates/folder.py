"""Template folders on disk: the declarative format (default, runs no code) and DiffSynth's ``model.py``.

Declarative (DESIGN.md 4.4)::

    template.json       format_version, name, architecture (built-in), config, weights, base_model,
                        inputs (schema), cache_keys, data_processor, license, description
    model.safetensors   (or shards listed in "weights")
    README.md           the model card

DiffSynth-compatible: ``model.py`` defining ``TEMPLATE_MODEL`` (a class), ``TEMPLATE_MODEL_PATH``
(str, list of shards, or None), optional ``TEMPLATE_MODEL_CONFIG`` (constructor kwargs) and
``TEMPLATE_DATA_PROCESSOR``. Executing ``model.py`` runs arbitrary code, so it requires
``trust_remote_code=True``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..loading import CheckpointError, load_module_from_files, save_safetensors_atomic, write_json_atomic
from ..loading.integrity import verify_sha256
from .base import TemplateError, check_template_model
from .registry import build_architecture, get_architecture
from .schema import InputSchema

logger = logging.getLogger(__name__)

TEMPLATE_JSON = "template.json"
MODEL_PY = "model.py"
FORMAT_VERSION = 1

#: how many times each folder's weights (or code) were read from disk in this process
DISK_READS: Counter[str] = Counter()
_CODE_CACHE: dict[tuple[str, str], ModuleType] = {}


class TemplateTrustError(TemplateError):
    """A folder holds code (model.py) and the caller did not opt in to running it."""


@dataclass
class TemplateSpec:
    """The contents of ``template.json``."""

    architecture: str
    config: dict[str, Any] = field(default_factory=dict)
    weights: list[str] = field(default_factory=lambda: ["model.safetensors"])
    name: str | None = None
    base_model: str | None = None
    base_backbone: str | None = None  # "flux2" | "zimage": loading onto another backbone is refused
    inputs: list[dict] | None = None
    cache_keys: list[str] = field(default_factory=list)
    data_processor: dict | None = None  # {"name": registered processor, "config": {...}}
    license: str | None = None
    description: str = ""
    revision: str | None = None  # pin of the source this package was built from, when known
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict, where: str) -> TemplateSpec:
        if not isinstance(data, dict) or "architecture" not in data:
            raise TemplateError(f"{where} must be a JSON object with at least an 'architecture' field")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise TemplateError(
                f"{where} has format_version {version}; this diffsynth_templates reads up to {FORMAT_VERSION}: upgrade it"
            )
        known = {f.name for f in fields(cls)} - {"extra"}
        spec = cls(**{k: v for k, v in data.items() if k in known})
        spec.extra = {k: v for k, v in data.items() if k not in known}
        if isinstance(spec.weights, str):
            spec.weights = [spec.weights]
        return spec

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **d}

    @property
    def schema(self) -> InputSchema | None:
        return InputSchema.from_json(self.inputs)


@dataclass
class LoadedTemplate:
    name: str
    model: nn.Module
    source: Path
    kind: str  # "declarative" | "diffsynth"
    schema: InputSchema | None = None
    data_processor: Any = None
    spec: TemplateSpec | None = None

    @property
    def base_model(self) -> str | None:
        return self.spec.base_model if self.spec else None


def detect_format(folder: Path) -> str:
    if (folder / TEMPLATE_JSON).is_file():
        return "declarative"
    if (folder / MODEL_PY).is_file():
        return "diffsynth"
    raise TemplateError(
        f"{str(folder)!r} is not a template folder: it has neither {TEMPLATE_JSON} (declarative format) "
        f"nor {MODEL_PY} (DiffSynth format); found {sorted(p.name for p in folder.iterdir())}"
    )


def load_template_folder(
    folder: str | os.PathLike,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> LoadedTemplate:
    folder = Path(folder)
    if not folder.is_dir():
        raise TemplateError(f"template folder {str(folder)!r} does not exist")
    kind = detect_format(folder)
    loaded = (
        _load_declarative(folder, torch_dtype, device)
        if kind == "declarative"
        else _load_diffsynth(folder, torch_dtype, device, trust_remote_code)
    )
    check_template_model(loaded.model, loaded.name)
    return loaded


def _load_declarative(folder: Path, torch_dtype, device) -> LoadedTemplate:
    where = str(folder / TEMPLATE_JSON)
    try:
        data = json.loads((folder / TEMPLATE_JSON).read_text())
    except json.JSONDecodeError as e:
        raise TemplateError(f"{where} is not valid JSON ({e})") from e
    spec = TemplateSpec.from_json(data, where)
    verify_sha256(folder)  # a no-op unless template.json pins digests; a mismatch means a corrupt download
    get_architecture(spec.architecture)  # an unknown architecture fails before any weight is read
    files = [folder / w for w in spec.weights]
    missing = [str(f.name) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{where} lists weight file(s) {missing} that are not in the folder")
    bad = [f.name for f in files if f.suffix != ".safetensors"]
    if bad:
        raise CheckpointError(
            f"{where} lists non-safetensors weights {bad}; only .safetensors files are read"
        )
    DISK_READS[str(folder.resolve())] += 1
    config_class = get_architecture(spec.architecture).config_class
    # fields added after folders were first written: a folder without one gets the value it was made with
    saved = {**getattr(config_class, "SAVED_BEFORE", {}), **spec.config} if spec.config else {}
    model = load_module_from_files(
        lambda: build_architecture(spec.architecture, saved),
        files,
        torch_dtype=torch_dtype,
        device=device,
    )
    model.eval().requires_grad_(False)
    schema = spec.schema or getattr(model, "input_schema", None)  # instances may derive it from their config
    processor = _declared_processor(spec.data_processor, where)
    return LoadedTemplate(spec.name or folder.name, model, folder, "declarative", schema, processor, spec)


def _declared_processor(entry: dict | None, where: str):
    if not entry:
        return None
    from .processors import get_processor

    if not isinstance(entry, dict) or "name" not in entry:
        raise TemplateError(
            f"{where}: data_processor must be an object with a 'name' (and optional 'config')"
        )
    return get_processor(entry["name"], **entry.get("config", {}))


def _exec_model_py(folder: Path) -> ModuleType:
    """Run ``model.py`` once per process per content hash (re-reads never re-execute the code)."""
    code_path = folder / MODEL_PY
    digest = hashlib.sha256(code_path.read_bytes()).hexdigest()
    key = (str(code_path.resolve()), digest)
    if key not in _CODE_CACHE:
        spec = importlib.util.spec_from_file_location(f"diffsynth_template_{digest[:16]}", code_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CODE_CACHE[key] = module
    return _CODE_CACHE[key]


def _load_diffsynth(folder: Path, torch_dtype, device, trust_remote_code: bool) -> LoadedTemplate:
    if not trust_remote_code:
        raise TemplateTrustError(
            f"{str(folder)!r} is a DiffSynth-format template: loading it executes {MODEL_PY}, arbitrary Python code. "
            "Read that file, and if you trust it pass trust_remote_code=True (infer.py: --trust_remote_code); "
            "or convert it to the declarative format with `python -m diffsynth_templates convert DIR`."
        )
    module = _exec_model_py(folder)
    if not hasattr(module, "TEMPLATE_MODEL"):
        raise TemplateError(f"{str(folder / MODEL_PY)!r} does not define TEMPLATE_MODEL")
    cls = module.TEMPLATE_MODEL
    config = dict(getattr(module, "TEMPLATE_MODEL_CONFIG", None) or {})
    weights = getattr(module, "TEMPLATE_MODEL_PATH", None)
    DISK_READS[str(folder.resolve())] += 1
    if weights is None:  # an untrained or weight-free template: built as its code says
        model = cls(**config)
        if isinstance(model, nn.Module):
            model = model.to(device=device, dtype=torch_dtype) if torch_dtype else model.to(device)
    else:
        files = [folder / w for w in ([weights] if isinstance(weights, str) else list(weights))]
        bad = [f.name for f in files if f.suffix != ".safetensors"]
        if bad:
            raise CheckpointError(
                f"TEMPLATE_MODEL_PATH names {bad}: only .safetensors weights are read (pickle files are never loaded)"
            )
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"TEMPLATE_MODEL_PATH names {missing}, which are not in {str(folder)!r}")
        model = load_module_from_files(lambda: cls(**config), files, torch_dtype=torch_dtype, device=device)
    if isinstance(model, nn.Module):
        model.eval().requires_grad_(False)
    processor = getattr(module, "TEMPLATE_DATA_PROCESSOR", None)
    schema = InputSchema.from_json(getattr(module, "TEMPLATE_INPUT_SCHEMA", None))
    return LoadedTemplate(folder.name, model, folder, "diffsynth", schema, processor)


def save_template_folder(
    folder: str | os.PathLike,
    model: nn.Module,
    spec: TemplateSpec,
    readme: str | None = None,
) -> Path:
    """Write a declarative template folder atomically: built in a temp dir beside it, then renamed in.

    ``spec.config`` defaults to the model's own ``config`` dataclass. An existing folder is replaced
    only once the new one is complete.
    """
    folder = Path(folder)
    if not spec.config and is_dataclass(getattr(model, "config", None)):
        spec.config = _jsonable(asdict(model.config))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        spec.weights = ["model.safetensors"]
        save_safetensors_atomic(model.state_dict(), tmp / "model.safetensors")
        write_json_atomic(spec.to_json(), tmp / TEMPLATE_JSON)
        (tmp / "README.md").write_text(readme or f"# {spec.name or folder.name}\n\n{spec.description}\n")
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def fingerprint_callable(fn: Callable | None) -> str:
    """A stable description of a data processor (for feature-cache fingerprints)."""
    if fn is None:
        return "none"
    config = getattr(fn, "config", None)
    return f"{type(fn).__module__}.{type(fn).__qualname__}:{json.dumps(_jsonable(asdict(config)) if is_dataclass(config) else None)}"
