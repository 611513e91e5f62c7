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

import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..loading import CheckpointError, load_module_from_files, write_json_atomic
from ..loading.integrity import SHA256_KEY, verify_sha256
from ..loading.json_io import to_json_value
from ..loading.mapped import MappedWeights, save_aligned_safetensors
from ..loading.paths import resolve_inside
from ..loading.write_safety import write_folder
from .base import TemplateError, check_template_model
from .registry import build_architecture, get_architecture
from .schema import FIELD_TYPES, InputField, InputSchema, TemplateInputError

logger = logging.getLogger(__name__)

TEMPLATE_JSON = "template.json"
MODEL_PY = "model.py"
FORMAT_VERSION = 1

#: how many times each folder's weights (or code) were read from disk in this process
DISK_READS: Counter[str] = Counter()
_CODE_CACHE: dict[tuple[str, str], ModuleType] = {}


class TemplateTrustError(TemplateError):
    """A folder holds code (model.py) and the caller did not opt in to running it."""


class TemplateJSONError(TemplateError):
    """``template.json`` is unreadable, not JSON, or a key has the wrong type or value."""


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
    def from_json(cls, data: Any, where: str) -> TemplateSpec:
        """Build the spec from parsed ``template.json`` after checking every key (``validate_template_json``)."""
        data = validate_template_json(data, where)
        known = {f.name for f in fields(cls)} - {"extra"}
        spec = cls(**{k: v for k, v in data.items() if k in known})
        spec.extra = {k: v for k, v in data.items() if k not in known}
        return spec

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**self.extra, **d}

    @property
    def schema(self) -> InputSchema | None:
        return InputSchema.from_json(self.inputs)


# --- template.json: the one validation of what a folder declares -----------------------------------

_OPTIONAL_STRINGS = ("name", "base_model", "base_backbone", "license", "revision")
_FIELD_KEYS = {f.name for f in fields(InputField)}


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _json_error(where: str, key: str, expected: str, value: Any) -> TemplateJSONError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return TemplateJSONError(f"{where}: {key!r} must be {expected}, got {shown} ({_type_name(value)})")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int too large for a float
        return False


def validate_template_json(data: Any, where: str) -> dict[str, Any]:
    """Check every key ``template.json`` may hold; return a normalized copy (``weights`` as a list,
    nulls of list/object keys as empty). Raises ``TemplateJSONError`` naming the key, the expected type
    and the value. Architecture ``config`` values are checked against the architecture's config class
    when it is built (``registry.build_architecture``); file names are checked for containment when the
    folder is read (``template_weight_files``)."""
    if not isinstance(data, dict):
        raise TemplateJSONError(f"{where} must be a JSON object, got {_type_name(data)}")
    data = dict(data)
    if "architecture" not in data:
        raise TemplateJSONError(
            f"{where} has no 'architecture' key: it must name a built-in architecture (e.g. \"value_kv\")"
        )
    architecture = data["architecture"]
    if not isinstance(architecture, str) or not architecture:
        raise _json_error(
            where, "architecture", "the name of a built-in architecture (a string)", architecture
        )
    version = data.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or version < 1:
        raise _json_error(where, "format_version", f"an integer from 1 to {FORMAT_VERSION}", version)
    if version > FORMAT_VERSION:
        raise TemplateJSONError(
            f"{where} has format_version {version}; this diffsynth_templates reads up to {FORMAT_VERSION}: upgrade it"
        )
    config = data.get("config")
    if config is None:
        data["config"] = {}
    elif not isinstance(config, dict):
        raise _json_error(where, "config", "an object of architecture settings", config)
    weights = data.get("weights", ["model.safetensors"])
    if isinstance(weights, str):
        weights = [weights]
    if not isinstance(weights, list) or not weights or not all(isinstance(w, str) for w in weights):
        raise _json_error(where, "weights", "a non-empty list of file names (strings)", weights)
    if len(set(weights)) != len(weights):
        raise TemplateJSONError(f"{where}: 'weights' lists a file more than once: {weights}")
    data["weights"] = list(weights)
    for key in _OPTIONAL_STRINGS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _json_error(where, key, "a string or null", data[key])
    description = data.get("description")
    if description is None:
        data["description"] = ""
    elif not isinstance(description, str):
        raise _json_error(where, "description", "a string", description)
    cache_keys = data.get("cache_keys")
    if cache_keys is None:
        data["cache_keys"] = []
    elif not isinstance(cache_keys, list) or not all(isinstance(k, str) for k in cache_keys):
        raise _json_error(where, "cache_keys", "a list of strings", cache_keys)
    _check_data_processor(data.get("data_processor"), where)
    _check_inputs(data.get("inputs"), where)
    _check_sha256(data.get(SHA256_KEY), where)
    return data


def _check_data_processor(entry: Any, where: str) -> None:
    if entry is None:
        return
    expected = 'an object {"name": "<registered processor>", "config": {...}} or null'
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise _json_error(where, "data_processor", expected, entry)
    unknown = sorted(set(entry) - {"name", "config"})
    if unknown:
        raise TemplateJSONError(
            f"{where}: 'data_processor' has unknown key(s) {unknown}; it takes name and config"
        )
    if entry.get("config") is not None and not isinstance(entry["config"], dict):
        raise _json_error(
            where, "data_processor.config", "an object of processor options or null", entry["config"]
        )


def _check_inputs(inputs: Any, where: str) -> None:
    """``inputs`` is null, a list of field objects, or ``{"fields": [...], "allow_extra": bool}``."""
    if inputs is None:
        return
    entries = inputs
    if isinstance(inputs, dict):
        unknown = sorted(set(inputs) - {"fields", "allow_extra"})
        if unknown:
            raise TemplateJSONError(
                f"{where}: 'inputs' has unknown key(s) {unknown}; it takes fields, allow_extra"
            )
        if not isinstance(inputs.get("allow_extra", False), bool):
            raise _json_error(where, "inputs.allow_extra", "true or false", inputs["allow_extra"])
        entries = inputs.get("fields", [])
    if not isinstance(entries, list):
        raise _json_error(where, "inputs", "a list of input field objects (or null)", inputs)
    for i, entry in enumerate(entries):
        key = f"inputs[{i}]"
        if not isinstance(entry, dict):
            raise _json_error(where, key, "an object with name, type, ...", entry)
        unknown = sorted(set(entry) - _FIELD_KEYS)
        if unknown:
            raise TemplateJSONError(
                f"{where}: {key} has unknown key(s) {unknown}; it takes {sorted(_FIELD_KEYS)}"
            )
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise _json_error(where, f"{key}.name", "a non-empty string", entry.get("name"))
        if not isinstance(entry.get("type", "any"), str) or entry.get("type", "any") not in FIELD_TYPES:
            raise _json_error(where, f"{key}.type", f"one of {list(FIELD_TYPES)}", entry.get("type"))
        if not isinstance(entry.get("required", True), bool):
            raise _json_error(where, f"{key}.required", "true or false", entry["required"])
        if not isinstance(entry.get("description", ""), str):
            raise _json_error(where, f"{key}.description", "a string", entry["description"])
        for bound in ("minimum", "maximum"):
            if entry.get(bound) is not None and not _is_finite_number(entry[bound]):
                raise _json_error(where, f"{key}.{bound}", "a finite number or null", entry[bound])
        try:
            field_ = InputField(**entry)
            if field_.default is not None:
                field_.check(field_.default, where)
        except (TemplateInputError, ValueError, TypeError) as e:
            raise TemplateJSONError(f"{where}: {key} is not a valid input field: {e}") from e


def _check_sha256(entry: Any, where: str) -> None:
    if entry is None:
        return
    if not isinstance(entry, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
    ):
        raise _json_error(where, SHA256_KEY, "an object mapping file names to hex sha256 digests", entry)


def read_template_json(folder: str | os.PathLike) -> TemplateSpec:
    """Read and validate ``folder/template.json``; every problem is a ``TemplateJSONError`` naming the file."""
    path = resolve_inside(folder, TEMPLATE_JSON, "template.json")
    where = str(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TemplateJSONError(f"{where} is not UTF-8 text ({e}); save it as UTF-8 JSON") from e
    except OSError as e:
        raise TemplateJSONError(f"cannot read {where}: {e}") from e
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a too-long integer, absurd nesting
        raise TemplateJSONError(f"{where} is not valid JSON ({e})") from e
    spec = TemplateSpec.from_json(data, where)
    for name in spec.extra.get(SHA256_KEY) or {}:  # hashing reads the file: it must be inside too
        resolve_inside(folder, name, f"{where} {SHA256_KEY!r} entry")
    return spec


def template_weight_files(folder: str | os.PathLike, spec: TemplateSpec) -> list[Path]:
    """The weight files ``spec`` names, each resolved inside ``folder``; they must be present safetensors."""
    folder = Path(folder)
    where = str(folder / TEMPLATE_JSON)
    files = [resolve_inside(folder, w, f"{where} 'weights' entry") for w in spec.weights]
    bad = [f.name for f in files if f.suffix != ".safetensors"]
    if bad:
        raise CheckpointError(
            f"{where} lists non-safetensors weights {bad}; only .safetensors files are read"
        )
    missing = [str(f.relative_to(folder)) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{where} lists weight file(s) {missing} that are not in the folder")
    return files


def _own_aligned_memory(model: nn.Module) -> None:
    """Give every CPU tensor its own (64-byte aligned) storage instead of a view into the file's bytes.

    safetensors hands out views at the file's data offset, which depends on the header length (the
    metadata, the key names); CPU matmul kernels take other code paths for unaligned data and round
    differently, so the same weights in two files gave images that differed by ~1e-6. Owning the memory
    makes the result depend on the weights only."""
    for module in model.modules():
        for registry in (module._parameters, module._buffers):
            for tensor in registry.values():
                if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % 64:
                    tensor.data = tensor.data.clone()


@dataclass
class LoadedTemplate:
    name: str
    model: nn.Module
    source: Path
    kind: str  # "declarative" | "diffsynth"
    schema: InputSchema | None = None
    data_processor: Any = None
    spec: TemplateSpec | None = None
    # the weight files' memory maps when the tensors are used in place (``map_weights=True``)
    mapped: MappedWeights | None = None
    host_state: dict | None = None  # pinned host copies of the weights, made on the first GPU move

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
    map_weights: bool = False,
) -> LoadedTemplate:
    """Read a template folder (either format). ``map_weights``: the weights stay views of their files'
    memory maps where they can (aligned, already in ``torch_dtype``, on the CPU), not copies; the
    returned ``mapped`` can drop their resident pages while the template is not used (the host store
    does, between calls)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TemplateError(f"template folder {str(folder)!r} does not exist")
    kind = detect_format(folder)
    reader = MappedWeights() if map_weights and torch.device(device).type == "cpu" else None
    loaded = (
        _load_declarative(folder, torch_dtype, device, reader)
        if kind == "declarative"
        else _load_diffsynth(folder, torch_dtype, device, trust_remote_code, reader)
    )
    loaded.mapped = reader
    check_template_model(loaded.model, loaded.name)
    return loaded


def _load_declarative(folder: Path, torch_dtype, device, reader=None) -> LoadedTemplate:
    where = str(folder / TEMPLATE_JSON)
    spec = read_template_json(folder)
    verify_sha256(folder)  # a no-op unless template.json pins digests; a mismatch means a corrupt download
    get_architecture(spec.architecture)  # an unknown architecture fails before any weight is read
    files = template_weight_files(folder, spec)
    processor = _declared_processor(spec.data_processor, where)  # a bad processor fails before the weights
    DISK_READS[str(folder.resolve())] += 1
    config_class = get_architecture(spec.architecture).config_class
    # fields added after folders were first written: a folder without one gets the value it was made with
    saved = {**getattr(config_class, "SAVED_BEFORE", {}), **spec.config} if spec.config else {}
    model = load_module_from_files(
        lambda: _meta_skeleton(spec.architecture, saved, where),
        files,
        torch_dtype=torch_dtype,
        device=device,
        reader=reader,
    )
    _own_aligned_memory(model)
    model.eval().requires_grad_(False)
    schema = spec.schema or getattr(model, "input_schema", None)  # instances may derive it from their config
    return LoadedTemplate(spec.name or folder.name, model, folder, "declarative", schema, processor, spec)


_SKELETONS: OrderedDict[tuple[str, str], nn.Module] = OrderedDict()
SKELETON_CACHE_SIZE = 8


def _meta_skeleton(architecture: str, config: dict, where: str) -> nn.Module:
    """A fresh ``build_architecture`` module on the meta device (the loader fills its weights). Many
    templates share an architecture and config (one per value, per subject): building one runs every
    submodule's initializer, copying a built one only clones the tree, so the build is done once."""
    key = (architecture, json.dumps(config, sort_keys=True, default=repr))
    skeleton = _SKELETONS.get(key)
    if skeleton is None:
        skeleton = build_architecture(architecture, config, where=f"{where} 'config'")
        if any(not t.is_meta for t in (*skeleton.parameters(), *skeleton.buffers())):
            return skeleton  # built off the meta device (it ignored the default device): not shared
        _SKELETONS[key] = skeleton
    _SKELETONS.move_to_end(key)
    while len(_SKELETONS) > SKELETON_CACHE_SIZE:
        _SKELETONS.popitem(last=False)
    return _clone_tree(skeleton, {})


_PLAIN_STATE = {name: getattr(nn.Module, name) for name in ("__getstate__", "__setstate__")}
_EMPTY_CONTAINERS = (dict, OrderedDict, set, list)


def _clone_tree(module: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy(module)``, faster for a tree of plain modules (a skeleton's clone was a quarter
    of a template's first load): each module's state is copied entry by entry, submodules by this
    function, empty containers (the hook dicts) made new, everything else by ``copy.deepcopy`` with the
    one ``memo``, so objects shared inside the tree stay shared in the copy. A module class with its own
    copy or pickle methods is left to ``copy.deepcopy``."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if any(getattr(cls, name) is not method for name, method in _PLAIN_STATE.items()) or any(
        getattr(cls, name, None) is not getattr(nn.Module, name, None)
        for name in ("__deepcopy__", "__reduce_ex__", "__reduce__")
    ):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__getstate__().items():
        if key == "_modules":
            state[key] = type(value)(
                (name, None if child is None else _clone_tree(child, memo)) for name, child in value.items()
            )
        elif type(value) in _EMPTY_CONTAINERS and not value:
            state[key] = type(value)()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def _declared_processor(entry: dict | None, where: str):
    """The registered processor ``template.json`` names (its shape was checked by validate_template_json)."""
    if not entry:
        return None
    from .processors import get_processor

    try:
        return get_processor(entry["name"], **(entry.get("config") or {}))
    except (ValueError, TypeError) as e:  # unknown name or option, a bad option value
        raise TemplateJSONError(f"{where}: 'data_processor' {entry!r} cannot be built: {e}") from e


def _exec_model_py(folder: Path) -> ModuleType:
    """Run ``model.py`` once per process per content hash (re-reads never re-execute the code)."""
    code_path = resolve_inside(folder, MODEL_PY, "template code")
    digest = hashlib.sha256(code_path.read_bytes()).hexdigest()
    key = (str(code_path.resolve()), digest)
    if key not in _CODE_CACHE:
        spec = importlib.util.spec_from_file_location(f"diffsynth_template_{digest[:16]}", code_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _CODE_CACHE[key] = module
    return _CODE_CACHE[key]


def _load_diffsynth(
    folder: Path, torch_dtype, device, trust_remote_code: bool, reader=None
) -> LoadedTemplate:
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
        entries = [weights] if isinstance(weights, str) else weights
        if not isinstance(entries, (list, tuple)) or not entries:
            raise CheckpointError(
                f"{str(folder / MODEL_PY)!r}: TEMPLATE_MODEL_PATH must be a file name, a list of them, or None; "
                f"got {weights!r}"
            )
        files = [resolve_inside(folder, w, f"{MODEL_PY} TEMPLATE_MODEL_PATH entry") for w in entries]
        bad = [f.name for f in files if f.suffix != ".safetensors"]
        if bad:
            raise CheckpointError(
                f"TEMPLATE_MODEL_PATH names {bad}: only .safetensors weights are read (pickle files are never loaded)"
            )
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"TEMPLATE_MODEL_PATH names {missing}, which are not in {str(folder)!r}")
        model = load_module_from_files(
            lambda: cls(**config), files, torch_dtype=torch_dtype, device=device, reader=reader
        )
        _own_aligned_memory(model)
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
    *,
    overwrite: bool = False,
) -> Path:
    """Write a declarative template folder through ``write_folder`` (a temp sibling renamed in).

    ``spec.config`` defaults to the model's own ``config`` dataclass. An existing non-empty folder is
    replaced only with ``overwrite=True`` and only when this project wrote it (``is_template_output``).
    """
    folder = Path(folder)
    with write_folder(folder, overwrite=overwrite, recognise=is_template_output, kind="template") as tmp:
        write_template_files(
            tmp, model, spec, readme or f"# {spec.name or folder.name}\n\n{spec.description}\n"
        )
    return folder


def write_template_files(folder: Path, model: nn.Module, spec: TemplateSpec, readme: str) -> None:
    """Write ``model.safetensors``, ``template.json`` and ``README.md`` into the (staging) ``folder``."""
    if not spec.config and is_dataclass(getattr(model, "config", None)):
        spec.config = to_json_value(asdict(model.config), fallback=None)
    spec.weights = ["model.safetensors"]
    # aligned, so a host store can use the weights in place (loading/mapped.py); any reader reads it
    save_aligned_safetensors(model.state_dict(), folder / "model.safetensors")
    write_json_atomic(spec.to_json(), folder / TEMPLATE_JSON)
    (folder / "README.md").write_text(readme)


#: what save_template_folder, convert and package_template write (folders from before the marker file)
_WRITTEN_FILES = {
    TEMPLATE_JSON,
    "README.md",
    "configuration.json",
    "model.safetensors",
    "model.safetensors.index.json",
}


def is_template_output(folder: Path) -> bool:
    """True for a folder holding only what this project writes into a template folder or package.

    Folders written before the marker file (``write_safety.MARKER``) stay replaceable with ``overwrite``;
    a single file of the user's (notes, a second ``template.json`` folder's data) makes it not ours.
    """
    if not (folder / TEMPLATE_JSON).is_file():
        return False
    for path in folder.iterdir():
        name = path.name
        if path.is_symlink():
            return False
        if path.is_dir():
            if name != "samples" or not all(p.is_file() and not p.is_symlink() for p in path.iterdir()):
                return False
        elif not (name in _WRITTEN_FILES or (name.startswith("model-") and name.endswith(".safetensors"))):
            return False
    return True


def fingerprint_callable(fn: Callable | None) -> str:
    """A stable description of a data processor (for feature-cache fingerprints)."""
    if fn is None:
        return "none"
    config = getattr(fn, "config", None)
    return f"{type(fn).__module__}.{type(fn).__qualname__}:{json.dumps(to_json_value(asdict(config), fallback=None) if is_dataclass(config) else None)}"
