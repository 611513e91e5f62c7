"""Packaging a trained checkpoint for publishing, and checking the package works.

A checkpoint is any declarative template folder (``template.json`` + safetensors), optionally with
``training_args.json`` and ``validation/*.png`` as the trainer writes them. ``package_template``
turns it into the folder that gets uploaded::

    template.json        name, base_model, license, description, inputs, cache_keys, weights, sha256
    model.safetensors    (or model-0000k-of-0000N.safetensors + model.safetensors.index.json)
    README.md            the model card (hub/card.py)
    configuration.json   what ModelScope reads for framework and task
    samples/*.png        the validation images, linked from the card

``verify_package`` loads the package back the way users will (no code execution), runs it on a base
pipeline with inputs synthesized from its schema and checks the image is finite.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..loading import iter_tensors, save_safetensors_atomic, write_json_atomic
from ..loading.integrity import SHA256_KEY, compute_sha256, verify_sha256
from ..loading.paths import PathContainmentError, resolve_inside
from ..loading.write_safety import check_output_folder, write_folder
from ..templates.folder import (
    TEMPLATE_JSON,
    TemplateSpec,
    is_template_output,
    load_template_folder,
    read_template_json,
    template_weight_files,
)
from ..templates.registry import get_architecture
from ..templates.schema import InputSchema
from .card import LIBRARY_NAME, CardContext, check_input_table, read_front_matter, render_model_card
from .upload import PublishError, package_files, validate_repo_id

logger = logging.getLogger(__name__)

DEFAULT_LICENSE = "apache-2.0"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TRAINING_ARGS = "training_args.json"
VALIDATION_DIR = "validation"
SAMPLES_DIR = "samples"
MAX_SAMPLES = 16
SAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.I)


class PackageError(PublishError):
    """A checkpoint cannot be packaged."""


class VerificationError(PublishError):
    """A package does not load or does not generate."""


PACKAGE = "package folder"


def parse_size(size: int | str | None) -> int | None:
    """``2GB``, ``500MB``, ``1.5G``, ``1024`` -> bytes (powers of 1024); None means "no sharding".

    Anything else, and sizes below one byte (``0``, ``-1``), is a ``PackageError`` naming the value.
    """
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise PackageError(f"shard size must be a size such as 2GB or a number of bytes, got {size!r}")
    match = _SIZE.match(size) if isinstance(size, str) else None
    if isinstance(size, str) and not match:
        raise PackageError(
            f"cannot read shard size {size!r}: use bytes or a number with KB, MB, GB (e.g. 2GB)"
        )
    nbytes = (
        size
        if isinstance(size, int)
        else int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2).upper() or " "))
    )
    if nbytes < 1:
        raise PackageError(
            f"shard size {size!r} is less than one byte; give a positive size such as 2GB, or leave it out for "
            "one weight file"
        )
    return nbytes


# --- packaging -------------------------------------------------------------------------------------


def package_template(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str,
    base_model: str | None = None,
    license: str | None = None,
    description: str | None = None,
    shard_size: int | str | None = None,
    torch_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Build the publishable folder for ``checkpoint_dir`` at ``out_dir`` (through ``write_folder``: a temp
    sibling renamed in). An existing ``out_dir`` is replaced only with ``overwrite=True`` and only when
    this project wrote it (its marker file, or nothing but the files a package holds); the checkpoint,
    the current and home directories are never written.

    ``base_model``, ``license`` and ``description`` override what the checkpoint's template.json says
    (the license defaults to apache-2.0). Weights larger than ``shard_size`` bytes are split into shards.
    ``torch_dtype`` (e.g. ``torch.bfloat16``) stores the floating-point weights in that precision
    (half the download; loading casts them to whatever dtype the user asks for).
    """
    repo_id = validate_repo_id(repo_id)
    src, out = Path(checkpoint_dir), Path(out_dir)
    shard_bytes = parse_size(shard_size)
    # fail before reading anything when the folder may not be written (user files, the source, cwd, ...)
    check_output_folder(out, sources=[src], overwrite=overwrite, recognise=is_template_output, what=PACKAGE)
    spec = _read_checkpoint(src)
    verify_sha256(src)  # a checkpoint that records hashes must still match them
    load_template_folder(src)  # the weights fit the architecture and are finite (runs no code)
    cls = get_architecture(spec.architecture)
    schema = spec.schema or getattr(cls, "input_schema", None)
    tensors = _read_tensors(src, spec)
    if torch_dtype is not None:
        if not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
            raise PackageError(f"torch_dtype must be a floating-point torch.dtype, got {torch_dtype!r}")
        tensors = {k: t.to(torch_dtype) if t.is_floating_point() else t for k, t in tensors.items()}

    spec = replace(
        spec,
        name=repo_id.split("/")[1],
        base_model=base_model or spec.base_model,
        license=license or spec.license or DEFAULT_LICENSE,
        description=description if description is not None else spec.description,
        inputs=schema.to_json() if schema is not None else None,
        cache_keys=list(spec.cache_keys or getattr(cls, "cache_keys", ())),
        extra={k: v for k, v in spec.extra.items() if k != SHA256_KEY},
    )
    if not spec.base_model:
        logger.warning("no base model recorded for %s: pass base_model= (CLI: --base_model ID)", src)

    with write_folder(
        out, sources=[src], overwrite=overwrite, recognise=is_template_output, kind="package", what=PACKAGE
    ) as tmp:
        spec.weights = _save_weights(tensors, tmp, shard_bytes)
        spec.extra[SHA256_KEY] = compute_sha256(tmp, spec.weights)
        spec.extra["packaged_with"] = f"{LIBRARY_NAME} {__version__}"
        write_json_atomic(spec.to_json(), tmp / TEMPLATE_JSON)
        write_json_atomic(
            {"framework": "pytorch", "task": "text-to-image-synthesis", "library_name": LIBRARY_NAME},
            tmp / "configuration.json",
        )
        ctx = CardContext(
            repo_id,
            spec,
            schema,
            training_args=_read_training_args(src),
            samples=_copy_samples(src, tmp),
            files=[(w, (tmp / w).stat().st_size) for w in spec.weights],
        )
        (tmp / "README.md").write_text(render_model_card(ctx))
    logger.info("packaged %s as %s in %s", src, repo_id, out)
    return out


def _read_checkpoint(src: Path) -> TemplateSpec:
    if not src.is_dir():
        raise PackageError(f"checkpoint {str(src)!r} does not exist or is not a folder")
    if not (src / TEMPLATE_JSON).is_file():
        if (src / "model.py").is_file():
            raise PackageError(
                f"{str(src)!r} is a DiffSynth-format folder (model.py): convert it to the declarative format "
                f"first with `python -m diffsynth_templates convert {src} --out OUT`, then publish OUT"
            )
        raise PackageError(
            f"{str(src)!r} is not a template checkpoint: it has no {TEMPLATE_JSON} (found "
            f"{sorted(p.name for p in src.iterdir())})"
        )
    return read_template_json(src)


def _read_tensors(src: Path, spec: TemplateSpec) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in iter_tensors(template_weight_files(src, spec)):
        if key in tensors:
            raise PackageError(f"tensor {key!r} appears in more than one weight file of {str(src)!r}")
        tensors[key] = tensor
    return tensors


def _save_weights(tensors: dict[str, torch.Tensor], folder: Path, shard_size: int | None) -> list[str]:
    """One ``model.safetensors``, or shards of at most ``shard_size`` bytes (a bigger tensor gets its own)."""
    nbytes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    total = sum(nbytes.values())
    if not shard_size or total <= shard_size:
        save_safetensors_atomic(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return [WEIGHTS_NAME]
    groups: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        if groups[-1] and size + nbytes[key] > shard_size:
            groups.append({})
            size = 0
        groups[-1][key] = tensor
        size += nbytes[key]
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        save_safetensors_atomic(group, folder / name, metadata={"format": "pt"})
    weight_map = {key: name for name, group in zip(names, groups) for key in group}
    write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map}, folder / INDEX_NAME)
    return names


def _read_training_args(src: Path) -> dict | None:
    path = resolve_inside(src, TRAINING_ARGS, "training arguments")
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON
        logger.warning("ignoring %s: not valid JSON (%s)", path, e)
        return None
    if not isinstance(data, dict):
        logger.warning("ignoring %s: expected a JSON object", path)
        return None
    return data


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _copy_samples(src: Path, dst: Path) -> list[str]:
    """Copy the newest validation images into ``samples/``; returns their package paths.

    They are looked for in ``CHECKPOINT/validation/``, else in the run folder around a trainer
    checkpoint (``RUN/checkpoint-N`` with ``RUN/validation/step-M.png``: those with M <= N).
    """
    folder, limit = src / VALIDATION_DIR, None
    if not folder.is_dir():
        folder = src.parent / VALIDATION_DIR
        step = re.fullmatch(r"checkpoint-(\d+)", src.name)
        if not folder.is_dir() or step is None:
            return []
        limit = int(step.group(1))
    images = sorted((p for p in folder.iterdir() if p.suffix.lower() in SAMPLE_SUFFIXES), key=_natural_key)
    if limit is not None:
        images = [p for p in images if _image_step(p) is not None and _image_step(p) <= limit]
    if len(images) > MAX_SAMPLES:
        logger.info("%d validation images; the card shows the last %d", len(images), MAX_SAMPLES)
        images = images[-MAX_SAMPLES:]
    out = []
    for image in images:
        try:  # a sample that is a symlink out of the run folder is not packaged
            resolve_inside(folder, image.name, "validation image")
        except PathContainmentError as e:
            logger.warning("not packaging %s: %s", image, e)
            continue
        (dst / SAMPLES_DIR).mkdir(exist_ok=True)
        shutil.copy2(image, dst / SAMPLES_DIR / image.name)
        out.append(f"{SAMPLES_DIR}/{image.name}")
    return out


def _image_step(path: Path) -> int | None:
    match = re.search(r"step[-_]?(\d+)", path.stem)
    return int(match.group(1)) if match else None


# --- verification ----------------------------------------------------------------------------------


def synthesize_inputs(schema: InputSchema | None, size: int = 32) -> dict[str, Any]:
    """Inputs a template should accept: numbers at mid-range, gray images, a centered square mask.

    Fields with a default are left to the schema; optional fields without one are left out.
    """
    out: dict[str, Any] = {}
    for f in schema.fields if schema else []:
        if f.default is not None or not f.required:
            continue
        lo, hi = f.minimum, f.maximum
        mid = (lo + hi) / 2 if lo is not None and hi is not None else lo if lo is not None else hi
        mid = 0.5 if mid is None else mid
        if f.type in ("int", "list[int]"):
            mid = round(mid)
        if f.type in ("float", "int"):
            out[f.name] = mid
        elif f.type.startswith("list"):
            out[f.name] = [mid] * 3
        elif f.type == "image":
            out[f.name] = Image.new("RGB", (size, size), (128, 128, 128))
        elif f.type == "mask":
            mask = np.zeros((size, size), np.uint8)
            mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
            out[f.name] = Image.fromarray(mask, "L")
        elif f.type == "bool":
            out[f.name] = False
        elif f.type == "str":
            out[f.name] = "a photo"
        else:
            raise VerificationError(
                f"input {f.name!r} has type {f.type!r}, so no test value can be made up for it: give one "
                "with template_inputs= (CLI: --verify_input 'NAME=VALUE')"
            )
    return out


def verify_package(
    folder: str | os.PathLike,
    base_pipe=None,
    template_inputs: dict[str, Any] | None = None,
    *,
    size: int = 32,
    steps: int = 2,
) -> dict[str, Any]:
    """Load ``folder`` with TemplatePipeline (no code execution) and generate one image with it.

    ``base_pipe`` defaults to ``random_flux2_pipeline()``; when a template's cache does not fit that tiny
    base (a template for the full-size model), its cache is still computed and checked but the
    generation is reported as skipped. Returns a report dict; raises ``VerificationError`` on failure.
    """
    from ..backbones.attention import KVCacheError
    from ..pipelines.lora import LoRAError
    from ..templates.cache import TemplateCacheError
    from ..templates.pipeline import TemplatePipeline
    from ..templates.residency import HostStore

    folder = Path(folder)
    report: dict[str, Any] = {"folder": str(folder), "files": package_files(folder)}
    try:
        read_template_json(folder)  # checked (types, names inside the folder) before any file is hashed
        report["sha256"] = verify_sha256(folder) or "not recorded"
    except Exception as e:
        raise VerificationError(str(e)) from e
    pipe = base_pipe
    if pipe is None:
        from ..pipelines.random_init import random_flux2_pipeline

        pipe = random_flux2_pipeline()
    try:
        tp = TemplatePipeline.from_pretrained(
            [str(folder)], torch_dtype=pipe.torch_dtype, device=pipe.device, host_store=HostStore()
        )
    except Exception as e:
        raise VerificationError(f"{str(folder)!r} does not load as a declarative template: {e}") from e
    loaded = tp.store.get(tp.slots[0].folder, tp.torch_dtype, False)
    report.update(architecture=loaded.spec.architecture, loaded_without_code=loaded.kind == "declarative")
    _check_card(folder, loaded.schema, report)

    inputs = {**synthesize_inputs(loaded.schema, size), **(template_inputs or {})}
    report["inputs"] = {k: _describe_value(v) for k, v in inputs.items()}
    item = {"model_id": 0, **inputs}
    try:
        outputs, _ = tp.run_templates(pipe, [item])
    except Exception as e:
        raise VerificationError(f"the template failed on inputs {report['inputs']}: {e}") from e
    report["cache"] = _check_cache(outputs[0].cache)

    call = dict(prompt="a photo of a cat", height=size, width=size, num_inference_steps=steps, seed=0)
    call.update(cfg_scale=1.0, output_type="np", progress=False)
    try:
        image = tp(pipe, template_inputs=[item], **call)
    except (TemplateCacheError, KVCacheError, LoRAError) as e:
        if base_pipe is not None:
            raise VerificationError(f"the template's cache does not fit the base pipeline: {e}") from e
        report["generated"] = False
        report["generation_skipped"] = (
            f"its cache does not fit the tiny built-in verification base ({e}); verify with the real base "
            "(base_pipe=, CLI: --verify_base MODEL) to generate"
        )
        return report
    image = np.asarray(image)
    if not np.isfinite(image).all():
        raise VerificationError("the generated image has NaN or infinite pixels")
    baseline = np.asarray(pipe(**call))
    report["generated"] = True
    report["image"] = {"shape": list(image.shape), "min": float(image.min()), "max": float(image.max())}
    report["max_abs_change_vs_no_template"] = float(np.abs(image - baseline).max())
    return report


def _check_card(folder: Path, schema: InputSchema | None, report: dict) -> None:
    readme = folder / "README.md"
    if not readme.is_file():
        raise VerificationError(f"{str(folder)!r} has no README.md model card")
    text = readme.read_text()
    meta = read_front_matter(text)
    if meta.get("library_name") != LIBRARY_NAME:
        raise VerificationError(f"README.md front matter lacks library_name: {LIBRARY_NAME}")
    try:
        check_input_table(text, schema)
    except ValueError as e:
        raise VerificationError(str(e)) from e
    report["card"] = {k: meta[k] for k in ("license", "base_model", "tasks") if k in meta}


def _check_cache(cache: Any, path: str = "") -> dict[str, Any]:
    """Every tensor finite; returns ``{path: shape}``."""
    if isinstance(cache, torch.Tensor):
        if cache.is_floating_point() and not torch.isfinite(cache).all():
            raise VerificationError(f"the template's cache {path or 'value'} has NaN or infinite values")
        return {path: list(cache.shape)}
    out: dict[str, Any] = {}
    if isinstance(cache, dict):
        for k, v in cache.items():
            out.update(_check_cache(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(cache, (list, tuple)):
        for i, v in enumerate(cache):
            out.update(_check_cache(v, f"{path}[{i}]"))
    return out


def _describe_value(value: Any) -> Any:
    if isinstance(value, Image.Image):
        return f"<{value.mode} image {value.size[0]}x{value.size[1]}>"
    return value
