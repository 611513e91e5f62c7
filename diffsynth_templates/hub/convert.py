"""Converting DiffSynth-format template folders (``model.py`` + weights) to the declarative format.

Nothing from the folder is executed. The weights' key names and shapes identify the layout; the few
settings weights cannot tell (e.g. the number of attention heads) are read from ``model.py`` as
*literals* with ``ast`` (``TEMPLATE_MODEL_CONFIG`` and the defaults of the model's ``__init__``).

Detection is table-driven: ``LAYOUT_RULES`` lists ``LayoutRule`` entries, each mapping one known
DiffSynth layout to a built-in architecture (``detect`` returns that architecture's config, or None
when the layout is not its own; ``rekey`` renames weight keys). ``register_layout`` adds one. A rule
whose architecture is not registered in this install is skipped.
"""

from __future__ import annotations

import ast
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import DiffSynthTemplatesError
from ..loading import CheckpointError, find_weight_files, iter_tensors, write_json_atomic
from ..loading.integrity import SHA256_KEY, compute_sha256
from ..loading.json_io import to_json_value
from ..loading.paths import resolve_inside
from ..loading.write_safety import check_output_folder, write_folder
from ..templates.folder import (
    MODEL_PY,
    TEMPLATE_JSON,
    TemplateSpec,
    is_template_output,
    write_template_files,
)
from ..templates.registry import available_architectures, build_architecture

logger = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class ConversionError(DiffSynthTemplatesError, ValueError):
    """A DiffSynth-format folder cannot be converted; the message lists what is supported."""


@dataclass
class ModelPyInfo:
    """What ``model.py`` states as literals (read with ``ast``, never executed)."""

    class_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # TEMPLATE_MODEL_CONFIG
    init_defaults: dict[str, Any] = field(default_factory=dict)  # literal defaults of __init__
    input_names: list[str] | None = None  # named parameters of process_inputs (not self / pipe)
    weights: list[str] | None = None  # TEMPLATE_MODEL_PATH when it is a literal
    data_processor: str | None = None  # the name TEMPLATE_DATA_PROCESSOR refers to

    @property
    def settings(self) -> dict[str, Any]:
        """Constructor arguments as the DiffSynth loader would pass them (config over defaults)."""
        return {**self.init_defaults, **self.config}


@dataclass
class DiffSynthSource:
    folder: Path
    files: list[Path]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    model_py: ModelPyInfo


@dataclass(frozen=True)
class LayoutRule:
    name: str
    architecture: str
    detect: Callable[[DiffSynthSource], dict[str, Any] | None]
    rekey: Callable[[str], str] = lambda key: key
    data_processor: dict | None = None


LAYOUT_RULES: list[LayoutRule] = []


def register_layout(rule: LayoutRule) -> LayoutRule:
    """Add a rule to the detection table (replacing one of the same name)."""
    LAYOUT_RULES[:] = [r for r in LAYOUT_RULES if r.name != rule.name] + [rule]
    return rule


# --- reading a DiffSynth folder without running it ------------------------------------------------


def read_model_py(path: Path) -> ModelPyInfo:
    """Literal facts of ``model.py``; anything that is not a literal is left out."""
    info = ModelPyInfo()
    try:
        tree = ast.parse(path.read_bytes().decode("utf-8"), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # not UTF-8, not Python
        logger.warning("cannot parse %s (%s); converting from the weights alone", path, e)
        return info
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for node in tree.body:
        if not (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            continue
        name, value = node.targets[0].id, node.value
        if name == "TEMPLATE_MODEL" and isinstance(value, ast.Name):
            info.class_name = value.id
        elif name == "TEMPLATE_DATA_PROCESSOR" and isinstance(value, ast.Name):
            info.data_processor = value.id
        elif name == "TEMPLATE_MODEL_CONFIG":
            config = _literal(value)
            info.config = config if isinstance(config, dict) else {}
        elif name == "TEMPLATE_MODEL_PATH":
            weights = _literal(value)
            if isinstance(weights, str):
                info.weights = [weights]
            elif isinstance(weights, (list, tuple)) and all(isinstance(w, str) for w in weights):
                info.weights = list(weights)
            elif weights is not None:
                raise ConversionError(
                    f"{str(path)!r}: TEMPLATE_MODEL_PATH must be a file name or a list of file names inside the "
                    f"folder, got {weights!r}"
                )
    cls = classes.get(info.class_name or "")
    if cls is not None:
        methods = {n.name: n for n in cls.body if isinstance(n, ast.FunctionDef)}
        if "__init__" in methods:
            info.init_defaults = _literal_defaults(methods["__init__"].args)
        if "process_inputs" in methods:
            args = methods["process_inputs"].args
            names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
            info.input_names = [n for n in names if n not in ("self", "pipe")]
    return info


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return None


def _literal_defaults(args: ast.arguments) -> dict[str, Any]:
    positional = args.posonlyargs + args.args
    pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    out = {}
    for arg, default in pairs:
        value = _literal(default)
        if value is not None:
            out[arg.arg] = value
    return out


def read_diffsynth_folder(folder: str | os.PathLike) -> DiffSynthSource:
    folder = Path(folder)
    if not (folder / MODEL_PY).is_file():
        what = (
            "already a declarative template"
            if (folder / TEMPLATE_JSON).is_file()
            else "not a template folder"
        )
        raise ConversionError(f"{str(folder)!r} has no {MODEL_PY}: it is {what}, nothing to convert")
    info = read_model_py(resolve_inside(folder, MODEL_PY, "DiffSynth template code"))
    files = _weight_files(folder, info)
    shapes, dtypes = {}, {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_slice(key)
                    shapes[key], dtypes[key] = tuple(tensor.get_shape()), tensor.get_dtype()
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"cannot read {str(path)!r}: {e}. The file is truncated or corrupt") from e
    return DiffSynthSource(folder, files, shapes, dtypes, info)


def _weight_files(folder: Path, info: ModelPyInfo) -> list[Path]:
    if info.weights:
        files = [resolve_inside(folder, w, f"{MODEL_PY} TEMPLATE_MODEL_PATH entry") for w in info.weights]
        bad = [f.name for f in files if f.suffix != ".safetensors"]
        if bad:
            raise ConversionError(f"TEMPLATE_MODEL_PATH names {bad}: only .safetensors weights are converted")
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConversionError(f"TEMPLATE_MODEL_PATH names {missing}, which are not in {str(folder)!r}")
        return files
    try:
        files = find_weight_files(folder)
    except CheckpointError as e:
        others = sorted(folder.glob("*.safetensors"))
        if len(others) != 1:
            raise ConversionError(f"cannot tell which weights of {str(folder)!r} to convert: {e}") from e
        files = others
    # found by name (or through a shard index): still refuse a symlink that leads out of the folder
    return [resolve_inside(folder, str(f.relative_to(folder)), "weight file") for f in files]


# --- the built-in layouts --------------------------------------------------------------------------


def value_kv_rule(embedder: str = "prefer_value_embedder", name: str | None = None) -> LayoutRule:
    """DiffSynth's value encoder (the Brightness example's ``ValueFormatModel``) -> ``value_kv``.

    Keys ``proj_{k,v}.{block}.{embedder}.{0,2}.{weight,bias}`` and ``proj_{k,v}.{block}.positional_embedding``;
    ``embedder`` names the MLP (``prefer_value_embedder`` in DiffSynth-Studio), renamed to value_kv's.
    """
    pattern = re.compile(
        rf"^proj_([kv])\.([^.]+)\.(?:{re.escape(embedder)}\.[02]\.(?:weight|bias)|positional_embedding)$"
    )

    def detect(src: DiffSynthSource) -> dict[str, Any] | None:
        if not src.shapes or not all(pattern.match(k) for k in src.shapes):
            return None
        blocks = sorted({pattern.match(k).group(2) for k in src.shapes}, key=_block_order)
        first = src.shapes.get(f"proj_k.{blocks[0]}.positional_embedding")
        w0 = src.shapes.get(f"proj_k.{blocks[0]}.{embedder}.0.weight")
        if first is None or w0 is None or len(first) != 2 or len(w0) != 2:
            return None
        (length, dim), dim_in = first, w0[1]
        expected = {}
        for side in "kv":
            for b in blocks:
                p = f"proj_{side}.{b}"
                expected |= {
                    f"{p}.{embedder}.0.weight": (dim, dim_in),
                    f"{p}.{embedder}.0.bias": (dim,),
                    f"{p}.{embedder}.2.weight": (dim, dim),
                    f"{p}.{embedder}.2.bias": (dim,),
                    f"{p}.positional_embedding": (length, dim),
                }
        if expected != src.shapes or dim_in % 2:
            return None
        inputs = src.model_py.input_names
        if inputs is not None and len(inputs) != 1:
            return None  # a value encoder reads exactly one scalar
        heads = src.model_py.settings.get("num_heads")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or dim % heads:
            raise ConversionError(
                f"{str(src.folder)!r} has the {rule.name} layout (hidden size {dim}), but the number of attention "
                f"heads cannot be read off the weights and {MODEL_PY} does not state a usable num_heads "
                f"(got {heads!r}) in TEMPLATE_MODEL_CONFIG or as a default of {src.model_py.class_name}.__init__. "
                "Add it to TEMPLATE_MODEL_CONFIG (e.g. 24 for FLUX.2-klein-4B) and convert again."
            )
        return {
            "values": [inputs[0] if inputs else "scale"],
            "block_names": blocks,
            "dim": dim,
            "num_heads": heads,
            "length": length,
            "embed_dim": dim_in,
        }

    rule = LayoutRule(
        name=name or f"DiffSynth value encoder ({embedder}: Brightness-style ValueFormatModel)",
        architecture="value_kv",
        detect=detect,
        rekey=(lambda key: key.replace(f".{embedder}.", ".prefer_value_embedder.")),
    )
    return rule


def _block_order(name: str) -> tuple:
    kind, _, index = name.partition("_")
    return ({"double": 0, "single": 1}.get(kind, 2), int(index) if index.isdigit() else 0, name)


register_layout(value_kv_rule())


# --- conversion ------------------------------------------------------------------------------------


def detect_layout(src: DiffSynthSource, architecture: str | None = None) -> tuple[LayoutRule, dict[str, Any]]:
    """The first rule (for ``architecture`` when given) whose detector accepts ``src``, and its config."""
    registered = set(available_architectures())
    if architecture is not None and architecture not in registered:
        raise ConversionError(
            f"unknown architecture {architecture!r}; built-in architectures are {sorted(registered)}"
        )
    for rule in LAYOUT_RULES:
        if rule.architecture not in registered or architecture not in (None, rule.architecture):
            continue
        config = rule.detect(src)
        if config is not None:
            return rule, config
    raise ConversionError(_unsupported_message(src, architecture, registered))


def _unsupported_message(src: DiffSynthSource, architecture: str | None, registered: set[str]) -> str:
    keys = sorted(src.shapes)
    sample = ", ".join(f"{k} {list(src.shapes[k])}" for k in keys[:4]) + (" ..." if len(keys) > 4 else "")
    known = "\n".join(
        f"  - {r.name} -> {r.architecture}"
        + ("" if r.architecture in registered else " (architecture not registered)")
        for r in LAYOUT_RULES
    )
    target = f" as {architecture!r}" if architecture else ""
    return (
        f"cannot convert {str(src.folder)!r}{target}: its weights ({len(keys)} tensors: {sample}) match no known "
        f"DiffSynth layout. Supported layouts:\n{known}\n"
        f"You can still load the folder as it is, running its {MODEL_PY}, once you have read that file and trust "
        "it: TemplatePipeline.from_pretrained([...], trust_remote_code=True) or infer.py --trust_remote_code."
    )


def convert_diffsynth_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    architecture: str | None = None,
    *,
    name: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the declarative equivalent of the DiffSynth-format folder ``src`` to ``dst`` (runs no code from ``src``).

    ``dst`` is written through ``write_folder``: never the source, a folder inside or above it, the
    current or home directory; an existing ``dst`` is replaced only with ``overwrite=True`` and only
    when this project wrote it.
    """
    check_output_folder(dst, sources=[src], overwrite=overwrite, recognise=is_template_output)  # fail early
    source = read_diffsynth_folder(src)
    rule, config = detect_layout(source, architecture)
    logger.info("%s: %s layout -> %s %s", source.folder, rule.name, rule.architecture, config)
    model = build_architecture(rule.architecture, config)
    dtypes = {source.dtypes[k] for k in source.shapes}
    if len(dtypes) == 1 and next(iter(dtypes)) in _SAFETENSORS_DTYPES:
        model = model.to(_SAFETENSORS_DTYPES[next(iter(dtypes))])  # keep the checkpoint's precision
    state = {rule.rekey(k): t for k, t in iter_tensors(source.files)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ConversionError(
            f"the weights of {str(source.folder)!r} do not fit {rule.architecture}: {e}"
        ) from e
    if missing or unexpected:
        raise ConversionError(
            f"the weights of {str(source.folder)!r} do not fit {rule.architecture} {config}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    schema = getattr(model, "input_schema", None)
    spec = TemplateSpec(
        architecture=rule.architecture,
        config=to_json_value(config, fallback=list),
        name=name or Path(dst).name,
        inputs=schema.to_json() if schema is not None else None,
        cache_keys=list(getattr(model, "cache_keys", ())),
        data_processor=rule.data_processor,
        description=f"Converted from a DiffSynth-format template ({rule.name}).",
        extra={
            "converted_from": {
                "format": "diffsynth",
                "layout": rule.name,
                "model_class": source.model_py.class_name,
                "data_processor_class": source.model_py.data_processor,
            }
        },
    )
    readme = (
        f"# {spec.name}\n\n{spec.description}\n\nArchitecture `{rule.architecture}`; loading this folder runs no code. "
        "Publish it with `python -m diffsynth_templates publish FOLDER --repo OWNER/NAME`.\n"
    )
    with write_folder(
        dst, sources=[src], overwrite=overwrite, recognise=is_template_output, kind="converted template"
    ) as tmp:
        write_template_files(tmp, model, spec, readme)
        spec.extra[SHA256_KEY] = compute_sha256(tmp, spec.weights)
        write_json_atomic(spec.to_json(), tmp / TEMPLATE_JSON)
    out = Path(dst)
    if source.model_py.data_processor:
        logger.warning(
            "%s defines TEMPLATE_DATA_PROCESSOR = %s; code is not carried over: set data_processor in %s to a "
            "registered processor if training needs one",
            source.folder,
            source.model_py.data_processor,
            out / TEMPLATE_JSON,
        )
    return out
