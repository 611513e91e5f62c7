"""Create the reference environment of ``benchmarks/compare_reference.py`` (DiffSynth-Studio's worker).

    python benchmarks/make_ref_env.py .venv-ref
    python benchmarks/compare_reference.py --diffsynth-python .venv-ref/bin/python --quick

The new environment sees everything the interpreter running this script sees (torch, diffusers,
transformers and this package, whether they live in the system Python or in a virtualenv) and adds
DiffSynth-Studio, torchvision and pandas on top. ``python -m venv --system-site-packages`` is not
enough: from inside a virtualenv it links the *base* interpreter's site-packages, not the
virtualenv's, so the worker would find no torch. Instead the new environment gets a ``.pth`` file that
adds this interpreter's site directories after its own (``site.addsitedir``, so their own ``.pth``
files, such as an editable install's, are processed too). Its own packages come first on
``sys.path``, so its torchvision and diffsynth win.

With a CPU-only torch keep DiffSynth in this separate environment: PyPI's Linux torchvision is a
CUDA build whose C++ ops cannot load next to a CPU torch (compare_reference.py then makes its Python
part importable), and ``--no-deps`` skips DiffSynth's training-only dependencies that this path does
not import.
"""

from __future__ import annotations

import argparse
import logging
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

logger = logging.getLogger(__name__)

# What the DiffSynth worker needs beyond this interpreter's packages (pinned as in pyproject's bench extra).
NO_DEPS_PACKAGES = ("torchvision==0.28.0", "diffsynth==2.1.12")
PACKAGES = ("pandas",)
PTH_NAME = "_diffsynth_templates_parent_env.pth"


class RefEnvError(RuntimeError):
    """The reference environment could not be created; the message says what to do."""


def parent_site_dirs() -> list[str]:
    """The site directories of the running interpreter (its venv's or the system's), existing ones only."""
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    paths = sysconfig.get_paths()
    dirs += [paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE and site.getusersitepackages():
        dirs.append(site.getusersitepackages())
    seen: list[str] = []
    for d in dirs:
        if Path(d).is_dir() and d not in seen:
            seen.append(d)
    return seen


def env_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def env_site_dir(python: Path) -> Path:
    """The new environment's own purelib, asked from its interpreter (its layout is its own business)."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def write_parent_pth(python: Path, dirs: list[str]) -> Path:
    """A ``.pth`` in the new environment that adds ``dirs`` after its own site directory."""
    target = env_site_dir(python)
    target.mkdir(parents=True, exist_ok=True)
    pth = target / PTH_NAME
    # One executable line (``.pth`` lines starting with ``import`` run at startup, exec'd without a
    # scope that comprehensions see, hence map); addsitedir also processes the parent's own .pth files
    # (editable installs).
    pth.write_text(f"import site; list(map(site.addsitedir, {dirs!r}))\n")
    return pth


def pip_install(python: Path, args: list[str]) -> None:
    cmd = [str(python), "-m", "pip", "install", "-q", *args]
    logger.info("%s", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        raise RefEnvError(f"`{' '.join(cmd)}` failed; see pip's output above (network or package index?)")


def make_ref_env(env: Path, install: bool = True) -> Path:
    """Create (or update) ``env`` and return its python. Idempotent: an existing env is reused."""
    env = env.resolve()
    if env == Path(sys.prefix).resolve():
        raise RefEnvError(f"{env} is the environment running this script; pass a new folder, e.g. .venv-ref")
    python = env_python(env)
    if not python.exists():
        if env.exists() and any(env.iterdir()):
            raise RefEnvError(f"{env} exists and is not a virtualenv; pass a new or empty folder")
        logger.info("creating %s", env)
        venv.EnvBuilder(with_pip=True, symlinks=sys.platform != "win32").create(env)
    pth = write_parent_pth(python, parent_site_dirs())
    logger.info("%s adds this interpreter's packages: %s", pth, ", ".join(parent_site_dirs()))
    check = subprocess.run(
        [str(python), "-c", "import torch, diffsynth_templates"], capture_output=True, text=True
    )
    if check.returncode != 0:
        raise RefEnvError(
            f"{python} cannot import torch and diffsynth_templates through {pth}: {check.stderr.strip()[-500:]}"
            " (install them in this interpreter first: pip install torch && pip install -e '.[test]')"
        )
    if install:
        pip_install(python, ["--no-deps", *NO_DEPS_PACKAGES])
        pip_install(python, list(PACKAGES))
    return python


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "env", type=Path, nargs="?", default=Path(".venv-ref"), help="folder (default: .venv-ref)"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="only create the env and its .pth; install nothing"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        python = make_ref_env(args.env, install=not args.no_install)
    except RefEnvError as e:
        parser.exit(1, f"error: {e}\n")
    print(python)


if __name__ == "__main__":
    main()
