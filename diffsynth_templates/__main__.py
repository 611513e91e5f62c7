"""``python -m diffsynth_templates``: publish templates to ModelScope, convert DiffSynth-format folders.

python -m diffsynth_templates publish CHECKPOINT --repo OWNER/NAME [--dry-run] [--public] [--overwrite] ...
python -m diffsynth_templates convert DIR --out OUT [--architecture NAME] [--overwrite]
python -m diffsynth_templates verify PACKAGE

A deliberate error (a ``DiffSynthTemplatesError``) is printed as ``error: <message>`` with exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import DiffSynthTemplatesError

logger = logging.getLogger("diffsynth_templates")


def _torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffsynth_templates", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    pub = sub.add_parser(
        "publish",
        help="package a trained checkpoint, verify it, upload it to ModelScope",
        description="Package CHECKPOINT (a declarative template folder) with a model card, check that it loads "
        "and generates, then upload it. The token comes from --token or $MODELSCOPE_API_TOKEN.",
    )
    pub.add_argument(
        "checkpoint", type=Path, help="declarative template folder (template.json + safetensors)"
    )
    pub.add_argument("--repo", required=True, metavar="OWNER/NAME", help="ModelScope model repository")
    pub.add_argument("--token", default=None, help="ModelScope access token (default: $MODELSCOPE_API_TOKEN)")
    vis = pub.add_mutually_exclusive_group()
    vis.add_argument(
        "--private", dest="private", action="store_true", default=True, help="new repo is private (default)"
    )
    vis.add_argument("--public", dest="private", action="store_false", help="new repo is public")
    pub.add_argument(
        "--base_model", default=None, help="base model id recorded in template.json and the card"
    )
    pub.add_argument(
        "--license", default=None, help="license id (default: the checkpoint's, else apache-2.0)"
    )
    pub.add_argument("--description", default=None, help="description for template.json and the card")
    pub.add_argument("--message", default=None, help="commit message")
    pub.add_argument(
        "--shard_size", default=None, help="split weights into shards of at most this size (e.g. 2GB; > 0)"
    )
    pub.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="store the weights in this precision (default: as trained)",
    )
    pub.add_argument(
        "--out", type=Path, default=None, help="package folder (default: models/packages/OWNER--NAME)"
    )
    pub.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing package folder (only one this tool wrote; other folders are never replaced)",
    )
    pub.add_argument(
        "--offline",
        action="store_true",
        help="never connect (also $DIFFSYNTH_TEMPLATES_OFFLINE=1): only --dry-run can then succeed",
    )
    pub.add_argument(
        "--endpoint",
        default=None,
        help="ModelScope endpoint (default: $MODELSCOPE_ENDPOINT or modelscope.cn)",
    )
    pub.add_argument(
        "--verify_base",
        default=None,
        metavar="MODEL",
        help="generate with this base model instead of the tiny random one",
    )
    pub.add_argument(
        "--verify_input", default=None, metavar="'KEY=VALUE ...'", help="inputs for the verification run"
    )
    pub.add_argument(
        "--dry-run",
        "--dry_run",
        dest="dry_run",
        action="store_true",
        help="stop after the verified package; upload nothing",
    )

    conv = sub.add_parser(
        "convert", help="turn a DiffSynth-format folder into a declarative one (runs none of its code)"
    )
    conv.add_argument("folder", type=Path, help="DiffSynth-format folder (model.py + safetensors)")
    conv.add_argument("--out", type=Path, required=True, help="declarative folder to write")
    conv.add_argument(
        "--architecture", default=None, help="built-in architecture to convert to (default: detect)"
    )
    conv.add_argument("--name", default=None, help="template name (default: the output folder's name)")
    conv.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder (only one this tool wrote; other folders are never replaced)",
    )

    ver = sub.add_parser("verify", help="check that a package loads without code and generates")
    ver.add_argument("folder", type=Path)
    ver.add_argument("--verify_base", default=None, metavar="MODEL")
    ver.add_argument("--verify_input", default=None, metavar="'KEY=VALUE ...'")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"publish": _publish, "convert": _convert, "verify": _verify}[args.command](args)
    except DiffSynthTemplatesError as e:  # a deliberate error: its message says what to do
        print(f"error: {e}", file=sys.stderr)
        return 2


def _publish(args) -> int:
    from .hub.package import package_template, parse_size, verify_package
    from .hub.upload import (
        DEFAULT_COMMIT_MESSAGE,
        check_online,
        resolve_endpoint,
        resolve_token,
        upload_package,
        validate_repo_id,
    )

    repo = validate_repo_id(args.repo)
    parse_size(args.shard_size)  # fail before the slow part: a bad size, offline mode, no token
    offline = True if args.offline else None  # None: $DIFFSYNTH_TEMPLATES_OFFLINE decides
    if not args.dry_run:
        check_online(offline)
    token = None if args.dry_run else resolve_token(args.token)
    inputs = _parse_inputs(args.verify_input)
    out = args.out or Path("models") / "packages" / repo.replace("/", "--")
    folder = package_template(
        args.checkpoint,
        out,
        repo_id=repo,
        base_model=args.base_model,
        license=args.license,
        description=args.description,
        shard_size=args.shard_size,
        torch_dtype=_torch_dtype(args.dtype),
        overwrite=args.overwrite,
    )
    report = verify_package(folder, _base_pipe(args.verify_base), inputs)
    _print_report(report)
    files = report["files"]
    if args.dry_run:
        endpoint = resolve_endpoint(args.endpoint)
        visibility = "private" if args.private else "public"
        print(f"\ndry run: would upload {len(files)} file(s) to {repo} ({visibility} if new) at {endpoint}:")
        _print_files(files)
        return 0
    result = upload_package(
        folder,
        repo,
        token,
        args.private,
        args.message or DEFAULT_COMMIT_MESSAGE,
        endpoint=args.endpoint,
        offline=offline,
    )
    print(f"\nuploaded {len(result.files)} file(s) to {result.url}")
    _print_files(result.files)
    return 0


def _convert(args) -> int:
    from .hub.convert import convert_diffsynth_folder

    out = convert_diffsynth_folder(
        args.folder, args.out, args.architecture, name=args.name, overwrite=args.overwrite
    )
    spec = json.loads((out / "template.json").read_text())
    print(f"wrote {out} (architecture {spec['architecture']}, config {json.dumps(spec['config'])})")
    return 0


def _verify(args) -> int:
    from .hub.package import verify_package

    _print_report(verify_package(args.folder, _base_pipe(args.verify_base), _parse_inputs(args.verify_input)))
    return 0


def _base_pipe(source: str | None):
    if source is None:
        return None
    from .pipelines.flux2_pipeline import Flux2ImagePipeline

    return Flux2ImagePipeline.from_pretrained(source)


class VerifyInputError(DiffSynthTemplatesError, ValueError):
    """A --verify_input entry cannot be read."""


def _parse_inputs(text: str | None) -> dict | None:
    """``'scale=0.7 image=edge.png'``: JSON values when they parse, image files opened."""
    if not text:
        return None
    out = {}
    for pair in text.split():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise VerifyInputError(
                f"verification input {pair!r} is not KEY=VALUE (e.g. 'scale=0.7 image=a.png')"
            )
        if Path(value).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            from .loading.image_files import open_image  # lazily: loading imports torch

            out[key] = open_image(value, f"verification input {key}: image", error=VerifyInputError)
            continue
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _print_report(report: dict) -> None:
    print(f"package: {report['folder']}")
    print(
        f"  architecture: {report['architecture']} (loaded without running code: {report['loaded_without_code']})"
    )
    sha = report["sha256"]
    print(f"  sha256: {'verified for ' + ', '.join(sha) if isinstance(sha, dict) else sha}")
    print(f"  model card: {report.get('card')}")
    print(f"  inputs used: {report['inputs']}")
    print(f"  cache: {report['cache']}")
    if report["generated"]:
        image = report["image"]
        print(
            f"  generated: {image['shape']} finite, range [{image['min']:.3f}, {image['max']:.3f}], "
            f"max change vs no template {report['max_abs_change_vs_no_template']:.4f}"
        )
    else:
        print(f"  generation skipped: {report['generation_skipped']}")


def _print_files(files: list[tuple[str, int]]) -> None:
    from .hub.card import format_size

    width = max(len(name) for name, _ in files)
    for name, size in files:
        print(f"  {name:<{width}}  {format_size(size):>9}")
    print(f"  {'total':<{width}}  {format_size(sum(s for _, s in files)):>9}")


if __name__ == "__main__":
    sys.exit(main())
