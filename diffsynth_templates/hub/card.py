"""Model cards: the ``README.md`` of a published template, generated from its ``template.json``.

The card has YAML front matter (what ModelScope indexes: base model, tasks, tags, license,
library, frameworks), then a description, the input schema as a table, the cache keys, Python and
``infer.py`` usage, training settings and sample images. ``read_input_table`` parses the table back,
so a package can be checked against its schema.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..templates.folder import TemplateSpec
from ..templates.schema import InputField, InputSchema

LIBRARY_NAME = "diffsynth-templates"
DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.2-klein-base-4B"
TASK = "text-to-image-synthesis"
INPUT_COLUMNS = ("name", "type", "range", "default", "description")
REQUIRED = "required"
_LOCAL_PATH = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\.{1,2}/)")
NONE = "—"

CACHE_KEY_DOCS = {
    "kv_cache": "per-block key/value tokens appended inside the DiT's attention (merged with other templates by concatenation)",
    "lora": "a low-rank update of DiT Linear layers, applied at run time (merged by concatenating ranks)",
    "extra_text_embedding": "extra text tokens appended to the prompt embedding",
    "inpaint_mask": "a hard inpainting constraint (with `input_image`); one template per call may produce it",
    "input_image": "the image the pipeline starts from (img2img / inpainting)",
    "edit_image": "reference images the DiT attends to",
}


@dataclass
class CardContext:
    """Everything a card shows beyond ``template.json`` itself."""

    repo_id: str
    spec: TemplateSpec
    schema: InputSchema | None = None
    training_args: Mapping[str, Any] | None = None
    samples: Sequence[str] = ()  # paths inside the package, e.g. "samples/step_1000.png"
    files: Sequence[tuple[str, int]] = ()  # (path, size in bytes) of the weight files
    example_inputs: Mapping[str, Any] = field(default_factory=dict)  # overrides of the usage example


def render_model_card(ctx: CardContext) -> str:
    spec = ctx.spec
    name = spec.name or ctx.repo_id.split("/")[-1]
    parts = [
        _front_matter(ctx),
        f"# {name}\n",
        (spec.description.strip() or f"A Diffusion Template of architecture `{spec.architecture}`.") + "\n",
        _summary(ctx),
        "## Inputs\n",
        input_table(ctx.schema),
        _cache_keys(spec.cache_keys),
        _usage(ctx),
    ]
    if ctx.training_args:
        parts.append(_training(ctx.training_args))
    if ctx.samples:
        parts.append(_samples(ctx.samples))
    parts.append(
        "## About\n\nPackaged with diffsynth-templates (Diffusion Templates, Duan, Zhang, Chen, 2026, "
        "arXiv 2604.24351). Loading this folder runs no code from it: `template.json` names a built-in "
        "architecture and the weights are safetensors whose sha256 `template.json` records.\n"
    )
    return "\n".join(parts)


# --- front matter ----------------------------------------------------------------------------------


def _front_matter(ctx: CardContext) -> str:
    spec = ctx.spec
    meta: dict[str, Any] = {"frameworks": ["Pytorch"], "license": (spec.license or "other").lower()}
    meta["tasks"] = [TASK]
    if spec.base_model:
        meta["base_model"] = [spec.base_model]
        meta["base_model_relation"] = "adapter"
    meta["library_name"] = LIBRARY_NAME
    meta["tags"] = ["diffusion-templates", "flux2", f"template-{spec.architecture}"] + [
        k.replace("_", "-") for k in spec.cache_keys
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def read_front_matter(text: str) -> dict:
    """The YAML front matter of a card ({} when there is none)."""
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


# --- summary ---------------------------------------------------------------------------------------


def _summary(ctx: CardContext) -> str:
    spec = ctx.spec
    rows = [
        ("architecture", f"`{spec.architecture}` (built in: the folder holds no code)"),
        ("base model", f"`{spec.base_model}`" if spec.base_model else "not specified"),
        ("cache keys", ", ".join(f"`{k}`" for k in spec.cache_keys) or NONE),
        ("license", spec.license or "not specified"),
    ]
    if ctx.files:
        total = sum(size for _, size in ctx.files)
        rows.append(("weights", f"{len(ctx.files)} safetensors file(s), {format_size(total)}"))
    if spec.data_processor:
        rows.append(("data processor", f"`{spec.data_processor.get('name')}`"))
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --- input table -----------------------------------------------------------------------------------


def input_rows(schema: InputSchema | None) -> list[dict[str, str]]:
    """The cells of the input table, one dict per field."""
    if schema is None:
        return []
    return [
        {
            "name": f"`{f.name}`",
            "type": f.type,
            "range": _range_cell(f),
            "default": _default_cell(f),
            "description": f.description or NONE,
        }
        for f in schema.fields
    ]


def input_table(schema: InputSchema | None) -> str:
    if schema is None:
        return "This template declares no input schema: it accepts any inputs.\n"
    if not schema.fields:
        return "This template takes no inputs.\n"
    lines = ["| " + " | ".join(INPUT_COLUMNS) + " |", "|" + "---|" * len(INPUT_COLUMNS)]
    for row in input_rows(schema):
        lines.append("| " + " | ".join(_escape(row[c]) for c in INPUT_COLUMNS) + " |")
    note = "\n`model_id`, `step_start`, `step_end` and `strength` are read by the framework and work with every template.\n"
    if schema.allow_extra:
        note += "Inputs not listed here are passed through to the template.\n"
    return "\n".join(lines) + "\n" + note


def _range_cell(f: InputField) -> str:
    lo, hi = f.minimum, f.maximum
    if lo is None and hi is None:
        return NONE
    if lo is not None and hi is not None:
        return f"[{_num(lo)}, {_num(hi)}]"
    return f">= {_num(lo)}" if lo is not None else f"<= {_num(hi)}"


def _default_cell(f: InputField) -> str:
    if f.default is not None:
        return f"`{json.dumps(f.default)}`"
    return REQUIRED if f.required else NONE


def _num(x: float) -> str:
    return json.dumps(x)


def _escape(cell: str) -> str:
    return cell.replace("\n", " ").replace("|", "\\|")


def read_input_table(text: str) -> list[dict[str, str]]:
    """Parse the input table of a card back into ``{column: cell}`` dicts (backticks stripped)."""
    section = re.search(r"^## Inputs\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not section:
        return []
    rows = []
    for line in section.group(1).splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if tuple(cells) == INPUT_COLUMNS or set("".join(cells)) <= set("-: "):
            continue
        rows.append({col: cell.strip("`") for col, cell in zip(INPUT_COLUMNS, cells)})
    return rows


def check_input_table(text: str, schema: InputSchema | None) -> None:
    """Raise ``ValueError`` when the card's input table does not describe ``schema``."""
    want = [{k: v.strip("`") for k, v in row.items()} for row in input_rows(schema)]
    got = read_input_table(text)
    if got != want:
        raise ValueError(
            f"the model card's input table does not match the schema: card has {got}, schema gives {want}; "
            "regenerate the card with package_template"
        )


# --- cache keys, usage, training, samples ----------------------------------------------------------


def _cache_keys(keys: Sequence[str]) -> str:
    if not keys:
        return "## Cache keys\n\nNot declared.\n"
    lines = [f"- `{k}`: {CACHE_KEY_DOCS.get(k, 'a base-pipeline argument')}" for k in keys]
    return "## Cache keys\n\n" + "\n".join(lines) + "\n"


def example_inputs(schema: InputSchema | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Example values for the usage snippets: defaults, range midpoints, image file names."""
    out: dict[str, Any] = {}
    for f in schema.fields if schema else []:
        if f.default is not None:
            out[f.name] = f.default
        elif f.type in ("float", "int", "list[float]", "list[int]"):
            lo, hi = f.minimum, f.maximum
            mid = (lo + hi) / 2 if lo is not None and hi is not None else lo if lo is not None else hi
            mid = 0.5 if mid is None else mid
            mid = round(mid) if f.type in ("int", "list[int]") else mid
            out[f.name] = [mid] if f.type.startswith("list") else mid
        elif f.type in ("image", "mask"):
            out[f.name] = _ImagePath(f"{f.name}.png")
        elif f.type == "bool":
            out[f.name] = True
        elif f.type == "str":
            out[f.name] = "example"
    out.update(overrides or {})
    return out


class _ImagePath(str):
    """An image input in the snippets: ``Image.open(path)`` in Python, the bare path for infer.py."""


def _python_value(value: Any) -> str:
    return f"Image.open({str(value)!r})" if isinstance(value, _ImagePath) else repr(value)


def _cli_value(value: Any) -> str:
    if isinstance(value, _ImagePath):
        return str(value)
    return json.dumps(value).replace(" ", "")


def _usage(ctx: CardContext) -> str:
    base = ctx.spec.base_model or DEFAULT_BASE_MODEL
    inputs = example_inputs(ctx.schema, ctx.example_inputs)
    images = any(isinstance(v, _ImagePath) for v in inputs.values())
    call = ", ".join(['"model_id": 0'] + [f"{json.dumps(k)}: {_python_value(v)}" for k, v in inputs.items()])
    imports = ["import torch"] + (["from PIL import Image"] if images else [])
    python = "\n".join(
        imports
        + [
            "from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline",
            "from diffsynth_templates.templates import TemplatePipeline",
            "",
            f'pipe = Flux2ImagePipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16)',
            f'templates = TemplatePipeline.from_pretrained(["{ctx.repo_id}"], torch_dtype=torch.bfloat16)',
            "image = templates(",
            "    pipe,",
            f"    template_inputs=[{{{call}}}],",
            '    prompt="a photo of a cat",',
            "    cfg_scale=4.0,",
            "    num_inference_steps=50,",
            "    seed=0,",
            ")[0]",
            'image.save("image.png")',
        ]
    )
    pairs = " ".join(["model_id=0"] + [f"{k}={_cli_value(v)}" for k, v in inputs.items()])
    cli = (
        f"python infer.py --model {base} \\\n"
        f"    --template {ctx.repo_id} \\\n"
        f"    --template_input '{pairs}' \\\n"
        '    --prompt "a photo of a cat" --cfg_scale 4 --steps 50 --seed 0 --output image.png'
    )
    note = ""
    if not ctx.spec.base_model:
        note = f"\nThe base model is not recorded in `template.json`; `{base}` above is the reference base.\n"
    return (
        "## Usage\n\nFrom Python:\n\n```python\n" + python + "\n```\n\n"
        "From the command line (`infer.py` of diffsynth-templates):\n\n```bash\n" + cli + "\n```\n" + note
    )


def _training(args: Mapping[str, Any]) -> str:
    lines = ["## Training\n", "| setting | value |", "|---|---|"]
    for key, value in args.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        if isinstance(value, str) and _LOCAL_PATH.match(value):
            shown = "(local path)"  # where the researcher's files were is nobody else's business
        if len(shown) > 200:
            shown = shown[:197] + "..."
        lines.append(f"| `{_escape(str(key))}` | {_escape(shown)} |")
    return "\n".join(lines) + "\n"


def _samples(paths: Sequence[str]) -> str:
    lines = ["## Samples\n", "Validation images written during training:\n"]
    for path in paths:
        stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        lines.append(f"![{stem}]({path})")
    return "\n".join(lines) + "\n"
