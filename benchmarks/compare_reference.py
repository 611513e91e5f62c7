"""Side by side with the reference implementations: ours vs DiffSynth-Studio vs diffusers, same weights.

    python benchmarks/compare_reference.py --diffsynth-python .venv-ref/bin/python [--quick]
    python benchmarks/compare_reference.py --sizes 256 512 --steps 4 --repeats 3 --out benchmarks/RESULTS.md

One random-weight FLUX.2-klein folder of realistic proportions (8 heads x 64, 2 double + 6 single
blocks, written by our ``Flux2ImagePipeline.save_pretrained`` in the official diffusers layout) and
``value_kv`` KV templates (512 tokens per block, brightness-like) are loaded by

(a) ours: ``Flux2ImagePipeline`` + ``TemplatePipeline`` (declarative template folders);
(b) DiffSynth-Studio (PyPI ``diffsynth``): its ``Flux2ImagePipeline`` + ``diffsynth.diffusion.template.
    TemplatePipeline``, the same template weights in its ``model.py`` folder format;
(c) diffusers' ``Flux2KleinPipeline`` (no templates: its column is n/a there).

Each system lives in its own worker process (so peak RSS is per system); the controller sends the
runs one by one, interleaving systems run by run (A B C A B C ...), and reports medians:

- seconds per denoising step (cfg 4 and cfg 1) without templates and with 1, 2, 4 KV templates
  (cfg 4). Steps are timed inside the loop (a callback or DiffSynth's progress-bar hook stamps the
  end of every step); a run's value is (last stamp - first stamp) / (steps - 1), so text encoding,
  the first step's one-time costs and the VAE decode are not counted;
- template-stage seconds for 11 templates with lazy loading (running the templates and merging their
  caches: DiffSynth's ``call_single_side``, our ``TemplatePipeline.prepare``, i.e. what ``__call__``
  does before denoising): first call (from disk) and repeated calls (memo off, new inputs each call;
  DiffSynth re-reads every template from disk on every call by design), the systems interleaved call by call, plus ours
  with its default output memo when the inputs repeat (then the merged cache is reused too; run
  after the memo-off calls, so its memo is not held during them);
- peak host RSS per phase of runs (``VmHWM``, reset with ``/proc/self/clear_refs`` at each phase
  start, so it includes the loaded weights once touched) and CUDA max allocated on a GPU;
- output agreement: max abs difference of the images in [0, 1] before 8-bit quantization, ours vs
  diffusers (no templates) and ours vs DiffSynth (with and without the same templates). All three get
  the same initial noise ``[1, 128, H/16, W/16]`` (``latents`` / ``latents`` / ``initial_noise``), the
  same prompt, an empty negative prompt and 512 text tokens (DiffSynth's fixed length).

Environments. Ours and diffusers run in the interpreter that runs this script (the ``test`` extra).
DiffSynth runs in ``--diffsynth-python`` (default: ``$DIFFSYNTH_PYTHON``, else this interpreter);
``--no-diffsynth`` leaves its columns out and says so in the table. Running the whole script inside
the reference environment works too (it sees this package). The reference environment that works
with a CPU-only torch, from a system Python or a virtualenv alike (see README "Performance";
``benchmarks/make_ref_env.py`` says why ``venv --system-site-packages`` is not enough)::

    python benchmarks/make_ref_env.py .venv-ref

PyPI's Linux torchvision wheels are CUDA builds whose C++ ops cannot load next to a ``+cpu`` torch;
torchvision tolerates that except for two unconditional fake-kernel registrations (``nms``,
``qnms``), so the DiffSynth worker declares those two op schemas first (only when the ops library
fails to load). DiffSynth's FLUX.2 path uses only ``torchvision.transforms`` (Python).

Adapting DiffSynth to a small random model: it recognizes checkpoints by an md5 of their key names
and shapes and builds a fixed config per known hash. The worker registers this folder's hashes in
``diffsynth.configs.MODEL_CONFIGS`` with configs read from the folder's ``config.json`` files (its own
``Flux2DiT`` / ``Flux2VAE`` classes and state-dict converter; for the text encoder, which DiffSynth
only builds at 0.6B / 4B / 8B, a subclass of its ``ZImageTextEncoder`` that takes the Qwen3 config),
then calls its ordinary ``Flux2ImagePipeline.from_pretrained``. The random tokenizer is declared as a
plain ``PreTrainedTokenizerFast`` with a Qwen3 chat template so that transformers (used by DiffSynth
and diffusers) reads ``tokenizer.json`` as is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ holds results.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, not an installed one
import numpy as np
import torch
from results import write_section  # noqa: E402

PROMPT = "a red circle on a blue background"
TEXT_TOKENS = 512  # DiffSynth's Flux2ImagePipeline always pads the prompt to 512 tokens
KV_COUNTS = (1, 2, 4)
STAGE_TEMPLATES = 11
SYSTEMS = ("ours", "diffsynth", "diffusers")
LABELS = {"ours": "ours", "diffsynth": "DiffSynth-Studio", "diffusers": "diffusers"}
# Qwen3's chat template for what klein sends: user turns, generation prompt, thinking switched off
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)

# A value -> KV template in DiffSynth-Studio's model.py format: the parameter layout of its brightness
# example (proj_k / proj_v per block: prefer_value_embedder MLP + positional_embedding), so our
# ``value_kv`` weights load into it unchanged. TEMPLATE_MODEL_CONFIG is appended when written.
DIFFSYNTH_MODEL_PY = '''"""Scalar -> per-block KV tokens, DiffSynth-Studio template format (written by compare_reference.py)."""

import math

import torch


def value_embedding(value, channels=256, max_period=10000.0):
    half = channels // 2
    steps = torch.arange(half, dtype=torch.float32, device=value.device) / half
    angles = (value * 1000).float()[:, None] * torch.exp(-math.log(max_period) * steps)[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ValueTokens(torch.nn.Module):
    def __init__(self, dim, length):
        super().__init__()
        self.length = length
        self.prefer_value_embedder = torch.nn.Sequential(
            torch.nn.Linear(256, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim)
        )
        self.positional_embedding = torch.nn.Parameter(torch.zeros(length, dim))

    def forward(self, embedding):
        return self.prefer_value_embedder(embedding).squeeze(0).expand(self.length, -1) + self.positional_embedding


class ValueKVTemplate(torch.nn.Module):
    def __init__(self, block_names, dim, num_heads, length):
        super().__init__()
        self.block_names, self.num_heads, self.length = list(block_names), num_heads, length
        self.proj_k = torch.nn.ModuleDict({b: ValueTokens(dim, length) for b in self.block_names})
        self.proj_v = torch.nn.ModuleDict({b: ValueTokens(dim, length) for b in self.block_names})

    @torch.no_grad()
    def process_inputs(self, pipe, scale, **kwargs):
        return {"value": torch.tensor([scale], dtype=pipe.torch_dtype, device=pipe.device)}

    def forward(self, value, **kwargs):
        embedding = value_embedding(value).to(value.dtype)
        shape = (1, self.length, self.num_heads, -1)
        return {
            "kv_cache": {
                b: (self.proj_k[b](embedding).view(shape), self.proj_v[b](embedding).view(shape))
                for b in self.block_names
            }
        }


TEMPLATE_MODEL = ValueKVTemplate
TEMPLATE_MODEL_PATH = "model.safetensors"
'''


# ------------------------------------------------------------------------------------------------
# building the shared model folder and the templates (controller, main environment)
# ------------------------------------------------------------------------------------------------


def bench_dit_config():
    from diffsynth_templates import Flux2DiTConfig

    return Flux2DiTConfig(
        num_double_blocks=2,
        num_single_blocks=6,
        num_heads=8,
        head_dim=64,
        text_dim=96,
        axes_dims_rope=(16, 16, 16, 16),
    )


def build_model_folder(root: Path, dit_config=None) -> Path:
    """Random-weight klein folder (official layout); the tokenizer declared so transformers reads it as is."""
    from diffsynth_templates.pipelines.random_init import RandomPipelineSpec, random_flux2_pipeline

    pipe = random_flux2_pipeline(RandomPipelineSpec(dit=dit_config or bench_dit_config()))
    pipe.save_pretrained(root)
    # The official VAE checkpoints carry BatchNorm's step counter; DiffSynth loads strictly and wants it.
    from safetensors.torch import load_file, save_file

    for vae_file in (root / "vae").glob("*.safetensors"):
        weights = load_file(vae_file)
        weights.setdefault("bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
        save_file(weights, vae_file, metadata={"format": "pt"})
    # Our word-level random tokenizer is not Qwen's BPE: named Qwen2Tokenizer, transformers would
    # rebuild it and give other ids. A plain fast tokenizer reads tokenizer.json verbatim.
    config_path = root / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2))
    index = json.loads((root / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def build_templates(root: Path, dit_config, count: int, length: int, prefix: str) -> list[dict[str, str]]:
    """``count`` value_kv templates, each as a declarative folder (ours) and a DiffSynth model.py folder."""
    from diffsynth_templates.templates import build_architecture, save_template_folder
    from diffsynth_templates.templates.zoo import template_spec
    from diffsynth_templates.templates.zoo.value_kv import ValueKVConfig

    made = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        config = ValueKVConfig.for_dit(dit_config, length=length)
        model = build_architecture("value_kv", config.__dict__)
        for p in model.parameters():  # trained-looking weights, so the KV tokens carry something
            p.data.normal_(0, 0.02)
        ours = save_template_folder(root / f"{prefix}{i}", model, template_spec(model, name=f"{prefix}{i}"))
        theirs = root / f"{prefix}{i}-diffsynth"
        theirs.mkdir()
        try:  # same bytes, same key names: share the file
            os.link(ours / "model.safetensors", theirs / "model.safetensors")
        except OSError:
            (theirs / "model.safetensors").write_bytes((ours / "model.safetensors").read_bytes())
        model_config = dict(
            block_names=list(config.block_names),
            dim=config.dim,
            num_heads=config.num_heads,
            length=config.length,
        )
        (theirs / "model.py").write_text(DIFFSYNTH_MODEL_PY + f"TEMPLATE_MODEL_CONFIG = {model_config!r}\n")
        made.append({"ours": str(ours), "diffsynth": str(theirs)})
    return made


# ------------------------------------------------------------------------------------------------
# workers: one process per system, JSON lines on a private pipe
# ------------------------------------------------------------------------------------------------


def proc_status_kib(key: str) -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    if key == "VmHWM":  # not Linux: cumulative peak
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return 0


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass


def allow_torchvision_without_cpp_ops() -> str:
    """Let torchvision's Python parts import when its C++ ops cannot load (CUDA wheel, CPU torch)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "torchvision not installed"
    folder = Path(spec.origin).parent
    libs = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    try:
        torch.ops.load_library(str(libs[0]))
        return "torchvision C++ ops loaded"
    except (IndexError, OSError) as e:
        lib = torch.library.Library("torchvision", "DEF")  # kept alive in globals() below
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        globals()["_TORCHVISION_SHIM"] = lib
        return f"torchvision C++ ops unavailable ({type(e).__name__}); transforms only"


class Worker:
    """Shared bits: noise, timing, memory. Subclasses load one system and run its calls."""

    def __init__(self, root: Path, templates: list[dict], stage: list[dict], device: str, dtype: torch.dtype):
        self.root, self.device, self.dtype = root, torch.device(device), dtype
        self.templates, self.stage_templates = templates, stage
        self.info: dict[str, Any] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def noise(self, size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(1, 128, size // 16, size // 16, generator=g).to(self.device, self.dtype)

    def stamp(self, stamps: list[float]):
        def on_step_end(*args):  # ours and diffusers: (pipe, step, timestep, callback_kwargs)
            self.sync()
            stamps.append(time.perf_counter())
            return args[-1]

        return on_step_end

    def denoise(self, size: int, cfg: float, n_templates: int, steps: int, save: str | None) -> dict:
        stamps: list[float] = []
        image = self.generate(size, cfg, n_templates, steps, stamps)
        if len(stamps) != steps:
            raise RuntimeError(f"{len(stamps)} step stamps for {steps} steps")
        if save:
            np.save(save, np.asarray(image, dtype=np.float32).reshape(size, size, 3))
        return {"step_seconds": (stamps[-1] - stamps[0]) / (steps - 1)}

    def memory(self, reset: bool) -> dict:
        out = {"peak_rss_mib": proc_status_kib("VmHWM") / 1024, "rss_mib": proc_status_kib("VmRSS") / 1024}
        if self.device.type == "cuda":
            out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            if reset:
                torch.cuda.reset_peak_memory_stats(self.device)
        if reset:
            reset_peak_rss()
        return out

    def timed(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def template_inputs(self, n: int, call: int = 0) -> list[dict]:
        """``n`` inputs; ``call`` > 0 shifts every value (new inputs for each repeated stage call)."""
        return [{"model_id": i, "scale": round(0.25 + 0.05 * i + 0.001 * call, 3)} for i in range(n)]

    def stage_inputs(self, kind: str) -> list[dict]:
        """The stage's inputs: new ones for every ``repeated`` call (the same sequence in every worker)."""
        self.stage_calls = getattr(self, "stage_calls", 0) + (kind == "repeated")
        return self.template_inputs(len(self.stage_templates), self.stage_calls if kind == "repeated" else 0)


class OursWorker(Worker):
    def load(self) -> None:
        from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
        from diffsynth_templates.templates import TemplatePipeline
        from diffsynth_templates.templates.residency import HostStore

        self.TemplatePipeline, self.HostStore = TemplatePipeline, HostStore
        self.pipe = Flux2ImagePipeline.from_pretrained(self.root, torch_dtype=self.dtype, device=self.device)
        self.tps = {
            n: TemplatePipeline.from_pretrained(
                [t["ours"] for t in self.templates[:n]],
                torch_dtype=self.dtype,
                device=self.device,
                host_store=HostStore(),
            )
            for n in KV_COUNTS
            if n <= len(self.templates)
        }

    def generate(self, size, cfg, n_templates, steps, stamps):
        call = dict(
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            cfg_scale=cfg,
            latents=self.noise(size),
            max_sequence_length=TEXT_TOKENS,
            output_type="np",
            progress=False,
            callback_on_step_end=self.stamp(stamps),
        )
        if n_templates == 0:
            return self.pipe(**call)
        return self.tps[n_templates](self.pipe, template_inputs=self.template_inputs(n_templates), **call)

    def stage_call(self, kind: str) -> dict:
        """One timed template-stage call: ``first`` (a new lazy pipeline and host store: read from
        disk), ``repeated`` (that pipeline again, memo off) or ``memoized`` (default memo, filled)."""
        folders = [t["ours"] for t in self.stage_templates]
        inputs = self.stage_inputs(kind)
        if kind == "first":
            self.cold = self.TemplatePipeline.from_pretrained(
                folders, torch_dtype=self.dtype, device=self.device, lazy_loading=True, memo_size=0,
                host_store=self.HostStore(),
            )  # fmt: skip
        if kind == "memoized" and getattr(self, "warm", None) is None:
            self.warm = self.TemplatePipeline.from_pretrained(
                folders,
                torch_dtype=self.dtype,
                device=self.device,
                lazy_loading=True,
                host_store=self.cold.store,
            )
            self.warm.prepare(self.pipe, inputs, prompt=PROMPT, cfg_scale=1.0)  # fills the output memo
        tp = self.warm if kind == "memoized" else self.cold
        # what TemplatePipeline.__call__ does before denoising: run, validate, merge
        return {"seconds": self.timed(lambda: tp.prepare(self.pipe, inputs, prompt=PROMPT, cfg_scale=1.0))}


class DiffusersWorker(Worker):
    def load(self) -> None:
        import diffusers
        from diffusers import Flux2KleinPipeline

        self.info["diffusers"] = diffusers.__version__
        self.pipe = Flux2KleinPipeline.from_pretrained(self.root, torch_dtype=self.dtype).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def generate(self, size, cfg, n_templates, steps, stamps):
        if n_templates:
            raise ValueError("diffusers has no templates")
        return self.pipe(
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=cfg,
            latents=self.noise(size),
            max_sequence_length=TEXT_TOKENS,
            output_type="np",
            callback_on_step_end=self.stamp(stamps),
        ).images


class DiffSynthWorker(Worker):
    def load(self) -> None:
        self.info["torchvision"] = allow_torchvision_without_cpp_ops()
        from importlib.metadata import version

        import diffsynth  # noqa: F401
        from diffsynth.core import ModelConfig
        from diffsynth.diffusion.template import TemplatePipeline
        from diffsynth.pipelines.flux2_image import Flux2ImagePipeline

        self.info["diffsynth"] = version("diffsynth")
        self.ModelConfig, self.TemplatePipeline = ModelConfig, TemplatePipeline
        components = register_diffsynth_configs(self.root)
        self.pipe = Flux2ImagePipeline.from_pretrained(
            torch_dtype=self.dtype,
            device=str(self.device),
            model_configs=[ModelConfig(path=p) for p in components],
            tokenizer_config=ModelConfig(path=str(self.root / "tokenizer")),
        )
        # images as floats in [0, 1] (as ours / diffusers "np"), not 8-bit PIL, for the agreement check
        self.pipe.vae_output_to_image = lambda x: (
            (x.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        )
        self.tps = {
            n: TemplatePipeline.from_pretrained(
                torch_dtype=self.dtype,
                device=str(self.device),
                model_configs=[ModelConfig(path=t["diffsynth"]) for t in self.templates[:n]],
            )
            for n in KV_COUNTS
            if n <= len(self.templates)
        }

    def generate(self, size, cfg, n_templates, steps, stamps):
        def progress(iterable):  # DiffSynth's loop asks for the next timestep when a step has ended
            for item in iterable:
                yield item
                self.sync()
                stamps.append(time.perf_counter())

        call = dict(
            prompt=PROMPT,
            height=size,
            width=size,
            num_inference_steps=steps,
            cfg_scale=cfg,
            initial_noise=self.noise(size),
            progress_bar_cmd=progress,
        )
        if n_templates == 0:
            return self.pipe(**call)
        return self.tps[n_templates](self.pipe, template_inputs=self.template_inputs(n_templates), **call)

    def stage_call(self, kind: str) -> dict:
        """One timed template-stage call (lazy: DiffSynth reads every template on every call)."""
        if kind == "memoized":
            raise ValueError("DiffSynth-Studio has no output memo")
        configs = [self.ModelConfig(path=t["diffsynth"]) for t in self.stage_templates]
        if kind == "first":
            self.stage_tp = self.TemplatePipeline.from_pretrained(
                torch_dtype=self.dtype, device=str(self.device), model_configs=configs, lazy_loading=True
            )
        inputs = self.stage_inputs(kind)
        return {"seconds": self.timed(lambda: self.stage_tp.call_single_side(pipe=self.pipe, inputs=inputs))}


def register_diffsynth_configs(root: Path) -> list:
    """Teach DiffSynth's model detection this folder's component hashes; returns the component paths."""
    import inspect

    from diffsynth.configs import MODEL_CONFIGS
    from diffsynth.core.loader.file import hash_model_file
    from diffsynth.models.flux2_dit import Flux2DiT
    from diffsynth.models.flux2_vae import Flux2VAE
    from diffsynth.models.z_image_text_encoder import ZImageTextEncoder
    from transformers import Qwen3Config, Qwen3Model

    class TinyZImageTextEncoder(ZImageTextEncoder):
        """DiffSynth's klein text encoder (a Qwen3Model under ``.model``) at any Qwen3 config."""

        def __init__(self, **config):
            torch.nn.Module.__init__(self)
            self.model = Qwen3Model(Qwen3Config(**config))

    globals()["TinyZImageTextEncoder"] = TinyZImageTextEncoder

    def kwargs_for(cls, config: dict, rename: dict | None = None) -> dict:
        accepted = inspect.signature(cls.__init__).parameters
        out = {}
        for key, value in config.items():
            key = (rename or {}).get(key, key)
            if key in accepted:
                out[key] = tuple(value) if isinstance(value, list) else value
        return out

    def files(sub: str):
        paths = sorted(str(p) for p in (root / sub).glob("*.safetensors"))
        return paths[0] if len(paths) == 1 else paths

    def config(sub: str) -> dict:
        return json.loads((root / sub / "config.json").read_text())

    entries = [
        (
            "transformer",
            "flux2_dit",
            "diffsynth.models.flux2_dit.Flux2DiT",
            None,
            kwargs_for(Flux2DiT, config("transformer")),
        ),
        (
            "vae",
            "flux2_vae",
            "diffsynth.models.flux2_vae.Flux2VAE",
            None,
            kwargs_for(Flux2VAE, config("vae"), {"norm_num_groups": "num_groups"}),
        ),
        (
            "text_encoder",
            "z_image_text_encoder",
            f"{__name__}.TinyZImageTextEncoder",
            "diffsynth.utils.state_dict_converters.z_image_text_encoder.ZImageTextEncoderStateDictConverter",
            {k: v for k, v in config("text_encoder").items() if not k.startswith("_")},
        ),
    ]
    paths = []
    for sub, name, model_class, converter, kwargs in entries:
        path = files(sub)
        entry = {
            "model_hash": hash_model_file(path),
            "model_name": name,
            "model_class": model_class,
            "extra_kwargs": kwargs,
        }
        if converter:
            entry["state_dict_converter"] = converter
        MODEL_CONFIGS.append(entry)
        paths.append(path)
    return paths


WORKERS = {"ours": OursWorker, "diffusers": DiffusersWorker, "diffsynth": DiffSynthWorker}


def worker_main(args) -> None:
    """Serve jobs from stdin; replies go to a private copy of stdout (libraries' prints go to stderr)."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    spec = json.loads(Path(args.worker_spec).read_text())
    torch.set_grad_enabled(False)
    worker = WORKERS[args.worker](
        Path(spec["root"]), spec["templates"], spec["stage"], spec["device"], getattr(torch, spec["dtype"])
    )
    try:
        worker.load()
        reply.write(json.dumps({"ok": True, "info": worker.info}) + "\n")
    except Exception as e:  # reported to the controller, which decides
        reply.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        reply.flush()
        raise
    reply.flush()
    for line in sys.stdin:
        job = json.loads(line)
        op = job.pop("op")
        if op == "quit":
            break
        try:
            result = {"ok": True, **getattr(worker, op)(**job)}
        except Exception as e:
            import traceback

            traceback.print_exc()
            result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(result) + "\n")
        reply.flush()


# ------------------------------------------------------------------------------------------------
# controller
# ------------------------------------------------------------------------------------------------


class WorkerProcess:
    def __init__(self, system: str, python: str, spec_path: Path, log_path: Path):
        self.system, self.log_path = system, log_path
        self.log = open(log_path, "w")
        cmd = [python, os.path.abspath(__file__), "--worker", system, "--worker-spec", str(spec_path)]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1
        )
        self.info: dict = {}
        self.error: str | None = None

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.log.flush()
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(
                f"{self.system} worker exited (code {self.proc.poll()}); its log ends:\n{tail}"
            )
        return json.loads(line)

    def start(self) -> bool:
        hello = self.read()
        self.info, self.error = hello.get("info", {}), hello.get("error")
        return hello["ok"]

    def call(self, op: str, **job) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **job}) + "\n")
        self.proc.stdin.flush()
        out = self.read()
        if not out.pop("ok"):
            raise RuntimeError(f"{self.system} {op} {job} failed: {out['error']} (log: {self.log_path})")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def machine_description(device: str, dtype: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"CPU {cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.startswith("cuda"):
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text + f", {device} {dtype}, Python {platform.python_version()}"


def fmt(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if value >= 10 ** -(digits - 1) or value == 0 else f"{value:.2e}"


def ratio(ours: float | None, theirs: float | None) -> str:
    return "n/a" if ours is None or theirs is None or theirs == 0 else f"{ours / theirs:.2f}"


def run_benchmark(args) -> tuple[str, float]:
    """The markdown report and the largest image difference between ours and a reference."""
    device, dtype = args.device, args.dtype
    systems = [s for s in SYSTEMS if not (s == "diffsynth" and args.no_diffsynth)]
    if args.stage_only:  # diffusers has no templates
        systems = [s for s in systems if s != "diffusers"]
    pythons = {"ours": sys.executable, "diffusers": sys.executable, "diffsynth": args.diffsynth_python}
    with tempfile.TemporaryDirectory(prefix="compare-reference-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dit = bench_dit_config()
        build_model_folder(tmp / "model", dit)
        kv_count = 0 if args.stage_only else max(KV_COUNTS)
        templates = build_templates(tmp / "templates", dit, kv_count, args.kv_length, "kv")
        stage = build_templates(tmp / "templates", dit, STAGE_TEMPLATES, args.kv_length, "stage")
        spec = {
            "root": str(tmp / "model"),
            "templates": templates,
            "stage": stage,
            "device": device,
            "dtype": dtype,
        }
        (tmp / "spec.json").write_text(json.dumps(spec))
        os.sync()  # the folders just written are flushed: no first call waits on their writeback
        print(
            f"built the model and {len(templates) + len(stage)} templates in {time.perf_counter() - t0:.1f} s",
            file=sys.stderr,
        )

        workers: dict[str, WorkerProcess] = {}
        try:
            for s in systems:  # start all, then wait: they load in parallel
                workers[s] = WorkerProcess(s, pythons[s], tmp / "spec.json", tmp / f"{s}.log")
            for s in list(workers):
                if not workers[s].start():
                    hint = ""
                    if s == "diffsynth":
                        hint = (
                            " (create its environment with benchmarks/make_ref_env.py and pass --diffsynth-python, "
                            "or run with --no-diffsynth)"
                        )
                    raise RuntimeError(f"{s} worker could not load: {workers[s].error}{hint}")
            if args.stage_only:
                return stage_report(args, workers, systems), 0.0
            return measure(args, workers, systems, tmp)
        finally:
            for w in workers.values():
                w.close()


def measure_stage(systems: list[str], workers: dict, repeats: int) -> dict[str, dict[str, float]]:
    """The lazy template stage, systems interleaved call by call (first calls, then repeated ones):
    ``{system: {"first", "repeated", "memoized" (ours)}}`` in seconds (medians)."""
    first = {s: workers[s].call("stage_call", kind="first")["seconds"] for s in systems}
    runs: dict[tuple[str, str], list[float]] = {}
    kinds = [(s, "repeated") for s in systems] + [(s, "memoized") for s in systems if s == "ours"]
    for kind in ("repeated", "memoized"):  # the memo's outputs are not held during memo-off calls
        for _ in range(repeats):
            for s, k in kinds:
                if k == kind:
                    runs.setdefault((s, k), []).append(workers[s].call("stage_call", kind=k)["seconds"])
    return {
        s: {"first": first[s], **{kind: statistics.median(runs[(s, kind)]) for t, kind in kinds if t == s}}
        for s in systems
    }


def stage_report(args, workers: dict, systems: list[str]) -> str:
    """``--stage-only``: the lazy 11-template stage alone, with its peak RSS, as a markdown section."""
    for s in systems:
        workers[s].call("memory", reset=True)
    stage = measure_stage(systems, workers, args.repeats)
    peak = {s: workers[s].call("memory", reset=True)["peak_rss_mib"] for s in systems}
    other = next((s for s in systems if s != "ours"), None)

    def row(name: str, values: dict, digits: int = 4) -> str:
        theirs = values.get(other) if other else None
        return f"| {name} | {fmt(values.get('ours'), digits)} | {fmt(theirs, digits)} | {ratio(values.get('ours'), theirs)} |"

    n = STAGE_TEMPLATES
    rows = [
        row(f"{n} templates, lazy, first call s", {s: v["first"] for s, v in stage.items()}),
        row(
            f"{n} templates, lazy, repeated call s (ours: memo off)",
            {s: v["repeated"] for s, v in stage.items()},
        ),
        row(
            f"{n} templates, repeated identical inputs s (ours: default memo)",
            {
                "ours": stage["ours"]["memoized"],
                **{s: v["repeated"] for s, v in stage.items() if s != "ours"},
            },
        ),
        row("peak RSS MiB of the stage (process, both from their loaded base pipeline)", peak, 0),
    ]
    info = "; ".join(f"{LABELS[s]}: {workers[s].info}" for s in systems if workers[s].info)
    return "\n".join(
        [
            "## Template stage (benchmarks/compare_reference.py --stage-only)",
            "",
            f"Machine: {machine_description(args.device, args.dtype)}. {info}",
            "",
            f"{n} lazily loaded `value_kv` templates ({args.kv_length} KV tokens per block, 8 heads x 64, "
            f"2 double + 6 single blocks), each system in its own process, calls interleaved system by "
            f"system (first calls, then {args.repeats} repeated, then ours with its memo); medians. "
            + (args.note or ""),
            "",
            "| measure | ours | DiffSynth-Studio | ours / DiffSynth |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )


def measure(args, workers: dict, systems: list[str], tmp: Path) -> tuple[str, float]:
    steps_s: dict[tuple, list[float]] = {}
    images: dict[tuple, Path] = {}
    memory: dict[tuple, dict] = {}
    phases = {
        "no templates": [("cfg 4", 4.0, 0), ("cfg 1", 1.0, 0)],
        "KV templates": [(f"cfg 4, {n} KV template{'s' * (n > 1)}", 4.0, n) for n in KV_COUNTS],
    }
    for s in systems:
        workers[s].call("memory", reset=True)
    for phase, variants in phases.items():
        for size in args.sizes:
            jobs = [(v, s) for v in variants for s in systems if not (s == "diffusers" and v[2])]
            for r in range(-args.warmup, args.repeats):
                for (name, cfg, n), s in jobs:  # systems interleaved run by run
                    save = tmp / f"{s}-{size}-{cfg}-{n}.npy" if r == 0 else None
                    out = workers[s].call(
                        "denoise",
                        size=size,
                        cfg=cfg,
                        n_templates=n,
                        steps=args.steps,
                        save=str(save) if save else None,
                    )
                    print(
                        f"  {size} {name} {s}: {out['step_seconds']:.3f} s/step"
                        + (" (warm-up)" if r < 0 else ""),
                        file=sys.stderr,
                    )
                    if r >= 0:
                        steps_s.setdefault((size, name, s), []).append(out["step_seconds"])
                    if save:
                        images[(size, cfg, n, s)] = save
        for s in systems:
            memory[(phase, s)] = workers[s].call("memory", reset=True)

    stage = measure_stage([s for s in systems if s != "diffusers"], workers, args.repeats)
    for s in stage:
        memory[("template stage", s)] = workers[s].call("memory", reset=True)

    # ---- table -----------------------------------------------------------------------------------
    def cell(values: dict[str, float | None], digits: int = 4) -> str:
        cols = [fmt(values.get(s), digits) if s in systems else "not run" for s in SYSTEMS]
        return " | ".join(cols + [ratio(values.get("ours"), values.get(o)) for o in SYSTEMS[1:]])

    rows = []
    for size in args.sizes:
        for variants in phases.values():
            for name, _, _ in variants:
                med = {
                    s: statistics.median(steps_s[(size, name, s)])
                    for s in systems
                    if (size, name, s) in steps_s
                }
                rows.append(f"| {size}x{size} s / step, {name} | {cell(med)} |")
    n = STAGE_TEMPLATES
    rows.append(
        f"| template stage, {n} templates, lazy, first call s | "
        f"{cell({s: v['first'] for s, v in stage.items()})} |"
    )
    rows.append(
        f"| template stage, {n} templates, lazy, repeated call s (ours: memo off) | "
        f"{cell({s: v['repeated'] for s, v in stage.items()})} |"
    )
    if "ours" in stage:
        memo = {
            "ours": stage["ours"]["memoized"],
            **{s: v["repeated"] for s, v in stage.items() if s != "ours"},
        }
        rows.append(
            f"| template stage, {n} templates, repeated identical inputs s (ours: default memo) | "
            f"{cell(memo)} |"
        )
    for phase in (*phases, "template stage"):
        ran = [s for s in systems if (phase, s) in memory and (phase == "no templates" or s != "diffusers")]
        peak = {s: memory[(phase, s)]["peak_rss_mib"] for s in ran}
        rows.append(f"| peak RSS MiB, {phase} runs | {cell(peak, 0)} |")
        if args.device.startswith("cuda"):
            cuda = {s: memory[(phase, s)].get("cuda_peak_mib") for s in ran}
            rows.append(f"| CUDA max allocated MiB, {phase} runs | {cell(cuda, 0)} |")

    agreement, worst = [], 0.0
    for size in args.sizes:
        for cfg, count in [(4.0, 0), (1.0, 0)] + [(4.0, k) for k in KV_COUNTS]:
            if (size, cfg, count, "ours") not in images:
                continue
            ours = np.load(images[(size, cfg, count, "ours")])
            diffs = {}
            for s in SYSTEMS[1:]:
                if (size, cfg, count, s) in images:
                    diffs[s] = float(np.abs(ours - np.load(images[(size, cfg, count, s)])).max())
                    worst = max(worst, diffs[s])
            cols = [fmt(diffs.get(s), 2) if (size, cfg, count, s) in images else "n/a" for s in SYSTEMS[1:]]
            what = f"cfg {cfg:g}" + (
                f", {count} KV template{'s' * (count > 1)}" if count else ", no templates"
            )
            plain = images.get((size, cfg, 0, "ours"))
            change = fmt(float(np.abs(ours - np.load(plain)).max()), 3) if count and plain else "-"
            agreement.append(
                f"| {size}x{size} {what} | {' | '.join(cols)} | {change} | {float(ours.std()):.3f} |"
            )

    versions = {"ours": "diffsynth-templates"}
    for s in systems:
        versions.update(workers[s].info)
    settings = (
        f"{args.steps} steps per run (the first step not timed), median of {args.repeats} run(s) after "
        f"{args.warmup} warm-up, {TEXT_TOKENS} text tokens, {args.kv_length} KV tokens per block per template, "
        f"random weights: 8 heads x 64, 2 double + 6 single blocks"
    )
    not_run = "" if "diffsynth" in systems else "\n\nDiffSynth-Studio: not run (--no-diffsynth)."
    report = "\n".join(
        [
            "## Ours vs DiffSynth-Studio vs diffusers",
            "",
            f"Machine: {machine_description(args.device, args.dtype)}.",
            f"Versions: diffusers {versions.get('diffusers', 'n/a')}, diffsynth {versions.get('diffsynth', 'n/a')} "
            f"({versions.get('torchvision', 'torchvision n/a')}).",
            f"Settings: {settings}.{not_run}" + (f"\n\nNote: {args.note}" if args.note else ""),
            "",
            "| measure | ours | DiffSynth-Studio | diffusers | ours / DiffSynth | ours / diffusers |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "Output agreement (max abs difference of the images in [0, 1], same initial noise):",
            "",
            "| run | ours vs DiffSynth-Studio | ours vs diffusers | ours vs ours without templates | std of our image |",
            "|---|---|---|---|---|",
            *agreement,
            "",
        ]
    )
    return report, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[256], help="image sides (256, and 512 when asked)"
    )
    p.add_argument(
        "--steps", type=int, default=4, help="denoising steps per run (>= 2; the first is not timed)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system and variant")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system and variant first")
    p.add_argument("--kv-length", type=int, default=512, help="KV tokens per block per template")
    p.add_argument(
        "--quick", action="store_true", help="smallest settings (CI): 256, 2 steps, 1 run, no warm-up"
    )
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    p.add_argument(
        "--diffsynth-python",
        default=os.environ.get("DIFFSYNTH_PYTHON", sys.executable),
        help="interpreter of the environment with DiffSynth-Studio (default: $DIFFSYNTH_PYTHON or this one)",
    )
    p.add_argument("--no-diffsynth", action="store_true", help="compare ours with diffusers only")
    p.add_argument(
        "--stage-only",
        action="store_true",
        help="only the 11-template stage (ours vs DiffSynth), its own section",
    )
    p.add_argument(
        "--max-diff", type=float, default=None, help="exit 1 when ours and a reference differ more (CI)"
    )
    p.add_argument("--note", default="", help="a sentence about the run written under the settings")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.quick:
        args.sizes, args.steps, args.repeats, args.warmup = [256], 2, 1, 0
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.steps < 2:
        p.error("--steps must be >= 2: a run's first step is not timed")
    if any(s % 16 for s in args.sizes):
        p.error("--sizes must be multiples of 16")
    table, worst = run_benchmark(args)
    print(table)
    heading = "Template stage" if args.stage_only else "Ours vs DiffSynth-Studio vs diffusers"
    write_section(args.out, heading, table)
    if args.max_diff is not None and worst > args.max_diff:
        sys.exit(f"images disagree: max abs difference {worst:.3g} > --max-diff {args.max_diff:g}")
    print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
