"""What every backbone's pipeline shares: argument checks, component folders, CPU offload, KV casting, noise.

A pipeline class mixes in ``PipelineBase`` and provides ``dit``, ``vae``, ``text_encoder``,
``device``, ``torch_dtype`` and ``offload_device``.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..backbones.attention import KVCache
from ..errors import DiffSynthTemplatesError
from ..loading.finite import NonFiniteError, check_finite_number, check_finite_tensor, nonfinite_names
from ..loading.resolve import ModelNotFoundError, resolve_model_path
from .kv_schedule import ScheduledKVCache, stacked_side_bias
from .lora import LoRACache, applied_lora


class PipelineInputError(DiffSynthTemplatesError, ValueError, TypeError):
    """A pipeline call argument has the wrong type or value; the message names it and what is right.

    Both a ``ValueError`` and a ``TypeError``, so ``except`` clauses written for either keep working.
    """


# Largest image a call makes unless ``max_pixels=`` says otherwise: 4096 x 4096, 4x FLUX.2's 4 MP.
# Beyond it a typo (``--height 100000``) would try to allocate tens of GB before failing.
DEFAULT_MAX_PIXELS = 4096 * 4096
# what torch.Generator.manual_seed accepts
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class PipelineBase:
    backbone: str = ""  # "flux2" | "zimage": which templates fit (template.json's base_backbone)
    name_or_path: str | None = None  # what from_pretrained loaded (its transformer), for messages

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda"):
        """Keep components in host memory; each moves to ``device`` only while it runs."""
        self.offload_device = self.device = torch.device(device)
        for module in (self.dit, self.vae, self.text_encoder):
            module.to("cpu")
        return self

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
        if self.offload_device is None:
            yield module
            return
        module.to(self.offload_device)
        try:
            yield module
        finally:
            module.to("cpu")

    def _checked_kv(self, kv_cache: KVCache | None, batch: int, side: str) -> KVCache | None:
        """Validate once before denoising and cast once to the pipeline's device and dtype."""
        self.dit.validate_kv_cache(kv_cache, batch_size=batch, source=f"{side}kv_cache")
        check_finite_cache(kv_cache, f"{side}kv_cache")
        # empty entries are dropped: they change nothing and would only stop the CFG sides from batching
        cast = {
            n: (e[0].to(self.device, self.torch_dtype), e[1].to(self.device, self.torch_dtype))
            + tuple(extra.to(self.device) for extra in e[2:])  # a strength bias (kept in its dtype)
            for n, e in (kv_cache or {}).items()
            if e[0].shape[1] > 0
        }
        return cast or None

    def _initial_noise(self, batch: int, h: int, w: int, seed: int | None, latents: Tensor | None) -> Tensor:
        shape = (batch, self.dit.config.in_channels, h, w)
        if latents is not None:
            if not isinstance(latents, Tensor):
                raise PipelineInputError(
                    f"latents must be a tensor of shape {shape}, got {type(latents).__name__}"
                )
            if tuple(latents.shape) != shape:
                raise PipelineInputError(
                    f"latents have shape {tuple(latents.shape)}; expected {shape} for this size and batch"
                )
            check_finite_tensor("latents", latents)
            return latents.to(self.device, torch.float32)
        # sampled on the CPU in float32 so a seed gives the same image on any device
        generator = torch.Generator("cpu")
        generator.manual_seed(seed) if seed is not None else generator.seed()
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)


# The official layout's components, each a subfolder of the model repo.
COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer")


def default_device_and_dtype(device, torch_dtype) -> tuple[torch.device, torch.dtype]:
    """Explicit values win; otherwise CUDA in bfloat16 when there is a GPU, else the CPU in float32."""
    device = as_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch_dtype is not None and not (
        isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point
    ):
        raise PipelineInputError(
            f"torch_dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, ...), got {torch_dtype!r}"
        )
    return device, torch_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def as_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, or an error naming the value ("cpu", "cuda", "cuda:1", "mps", ...)."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise PipelineInputError(f"device must be like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from e


# What else a model's own folder holds that loading reads: family detection, the Z-Image shift,
# generation defaults. Downloaded with the model's components, so one resolution serves the run.
ROOT_PATTERNS = ("model_index.json", "config.json", "scheduler/*", "generation_defaults.json")


@dataclass(frozen=True)
class ComponentFolders:
    """A model's component folders, each source (the model, each override) resolved exactly once.

    Entry points (``from_pretrained``, ``infer.py``, the trainer) resolve once with
    ``component_folders`` and pass this down; ``folders["vae"]`` is a component's folder, ``root``
    the model's own folder (``None`` when every component came from elsewhere and it is not there).
    ``str(folders)`` is the model source as the user named it.
    """

    source: str
    root: Path | None
    components: Mapping[str, Path]
    roots: Mapping[str, Path]  # each component's source, resolved (where its config files are)
    # components given as one .safetensors file (``--transformer FILE``); their config comes from the
    # model's ``{name}/config.json`` (``components[name]``, which may not exist), see pipelines/single_file.py
    single_files: Mapping[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Path:
        return self.components[name]

    def __str__(self) -> str:
        return self.source


def component_folders(
    source, overrides: Mapping[str, Any], revision, cache_dir, offline, names: tuple[str, ...] = COMPONENTS
) -> ComponentFolders:
    """Each component's folder: from its override (a folder or repo id) when given, else from ``source``.

    Each distinct source is resolved once, with the allow-patterns of every component taken from it
    (and, for ``source``, ``ROOT_PATTERNS``). A ``ComponentFolders`` passed as ``source`` is returned
    as it is: it was resolved already.
    """
    if isinstance(source, ComponentFolders):
        return source
    single = _single_files(overrides, names, source)
    chosen = {name: (None if name in single else overrides.get(name)) or source for name in names}
    for name, where in chosen.items():
        if where is None:
            raise ModelNotFoundError(f"no {name} given: pass the model (or {name}=...)")
    roots: dict[str, Path] = {}
    for where in dict.fromkeys(str(w) for w in chosen.values()):
        patterns = [
            f"{name}/config.json" if name in single else f"{name}/*"
            for name in names
            if str(chosen[name]) == where
        ] + ["model_index.json"]
        if source is not None and where == str(source):
            patterns += [p for p in ROOT_PATTERNS if p not in patterns]
        roots[where] = resolve_model_path(
            where, allow_patterns=patterns, revision=revision, cache_dir=cache_dir, offline=offline
        )
    root = None if source is None else roots.get(str(source))
    if root is None and source is not None:  # every component came from elsewhere: root files only
        try:
            root = resolve_model_path(
                source, allow_patterns=list(ROOT_PATTERNS), revision=revision, cache_dir=cache_dir,
                offline=offline,
            )  # fmt: skip
        except FileNotFoundError:
            root = None
    components = {
        name: roots[str(w)] / name if name in single else _component_in(roots[str(w)], w, name)
        for name, w in chosen.items()
    }
    return ComponentFolders(
        "" if source is None else str(source), root, components, {n: roots[str(w)] for n, w in chosen.items()},
        single,
    )  # fmt: skip


def _single_files(overrides: Mapping[str, Any], names: tuple[str, ...], source) -> dict[str, Path]:
    """``transformer=FILE.safetensors``: one file, not a folder; the model gives its config."""
    single = {}
    for name in names:
        value = overrides.get(name)
        if value is None or not str(value).endswith(".safetensors"):
            continue
        if name != "transformer":
            raise ModelNotFoundError(
                f"{name}={str(value)!r}: only the transformer can be one .safetensors file"
            )
        if not Path(value).expanduser().is_file():
            raise ModelNotFoundError(f"single-file transformer {str(value)!r} does not exist")
        if source is None:
            raise ModelNotFoundError(
                f"a single-file transformer ({str(value)!r}) needs the model for its other components "
                "and its config: pass --model too"
            )
        single[name] = Path(value).expanduser()
    return single


def component_folder(source, name: str, revision, cache_dir, offline) -> Path:
    """The folder of one component: ``{source}/{name}/``, or ``source`` itself when it is that component."""
    return component_folders(source, {}, revision, cache_dir, offline, names=(name,))[name]


def _component_in(root: Path, source, name: str) -> Path:
    if (root / name).is_dir():
        return root / name
    marker = "tokenizer.json" if name == "tokenizer" else "config.json"
    if (root / marker).is_file():
        return root
    raise ModelNotFoundError(
        f"{str(source)!r} has no {name}/ folder (and no {marker} of its own); pass {name}=... pointing at one"
    )


def as_prompt_list(prompt, name: str, batch: int | None = None) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise PipelineInputError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    prompts = list(prompts)
    if batch is not None and len(prompts) != batch:
        if len(prompts) == 1:
            return prompts * batch
        raise PipelineInputError(f"{name} has {len(prompts)} entries; expected 1 or {batch} (one per prompt)")
    return prompts


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool, not a float) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PipelineInputError(
            f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise PipelineInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(seed: object) -> int | None:
    """``None`` (a random seed) or an integer torch's generator accepts."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not SEED_MIN <= seed <= SEED_MAX:
        raise PipelineInputError(
            f"seed must be an integer between {SEED_MIN} and {SEED_MAX} (or None for a random one), "
            f"got {seed!r}"
        )
    return int(seed)


def check_size(height: int, width: int, multiple: int, max_pixels: int | None = None, why: str = "") -> None:
    """Refuse sizes the model cannot make (not a positive multiple of ``multiple``) or too large ones.

    ``why`` says where ``multiple`` comes from (the VAE's downsampling times the DiT's patch size).
    """
    why = f" ({why})" if why else ""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < multiple:
            raise PipelineInputError(
                f"{name} must be an integer >= {multiple} and a multiple of {multiple}{why}, got {value!r}"
            )
        if value % multiple:
            lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
            raise PipelineInputError(
                f"{name}={value} is not a multiple of {multiple}; use {lower} or {upper}{why}"
            )
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else check_int("max_pixels", max_pixels, 1)
    if height * width > limit:
        raise PipelineInputError(
            f"height x width = {height} x {width} = {height * width} pixels exceeds max_pixels={limit}; "
            "pass a smaller size, or max_pixels= a larger bound if the memory is there"
        )


def check_call(
    output_type,
    cfg_scale,
    denoising_strength,
    input_image,
    inpaint_mask,
    num_inference_steps: int = 1,
    tensors: Mapping[str, object] | None = None,
    max_sequence_length: int = 1,
    callback_on_step_end: object = None,
) -> None:
    """Every scalar call argument, once per call (never per step); ``tensors``: optional tensor
    arguments by name, each a tensor or None and finite."""
    if output_type not in ("pil", "np", "latent"):
        raise PipelineInputError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
    try:
        cfg = check_finite_number("cfg_scale", cfg_scale)
        strength = check_finite_number("denoising_strength", denoising_strength)
    except NonFiniteError as e:
        raise PipelineInputError(str(e)) from e
    if cfg < 0:
        raise PipelineInputError(f"cfg_scale must be a number >= 0, got {cfg_scale!r}")
    if not 0.0 < strength <= 1.0:
        raise PipelineInputError(f"denoising_strength must be in (0, 1], got {denoising_strength!r}")
    check_int("num_inference_steps", num_inference_steps, 1)
    check_int("max_sequence_length", max_sequence_length, 1)
    if denoising_strength != 1.0 and input_image is None:
        raise PipelineInputError(
            f"denoising_strength={denoising_strength} needs an input_image to start from"
        )
    if inpaint_mask is not None and input_image is None:
        raise PipelineInputError(
            "inpaint_mask needs input_image: the mask says which pixels of input_image to regenerate"
        )
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise PipelineInputError(
            f"callback_on_step_end must be a function (pipe, step, timestep, {{'latents': ...}}), got {callback_on_step_end!r}"
        )
    for name, value in (tensors or {}).items():
        if value is None:
            continue
        if not isinstance(value, Tensor):
            raise PipelineInputError(f"{name} must be a tensor, got {type(value).__name__}")
        check_finite_tensor(name, value)


def check_finite_cache(cache: object, where: str) -> None:
    """Raise ``NonFiniteError`` naming the entries of a KV cache / LoRA (nested dicts and tuples of
    tensors) that hold NaN or inf: such a cache turns every image black."""
    bad = nonfinite_names(_tensor_leaves(cache, ""))
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(f"{where}: tensor(s) {bad[:5]}{more} hold NaN or inf values")


def _tensor_leaves(value: object, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        yield prefix or "tensor", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensor_leaves(item, f"{prefix}[{key!r}]")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensor_leaves(item, f"{prefix}[{i}]")
    elif hasattr(value, "entries"):  # a ScheduledKVCache: (cache, start, end) per entry
        yield from _tensor_leaves([e[0] for e in value.entries], prefix)


def check_finite_output(images: Tensor, what: str) -> None:
    """The last guard: a non-finite result raises instead of being saved as a black image."""
    if nonfinite_names([(what, images)]):
        raise NonFiniteError(
            f"the {what} hold NaN or inf values, so the image would be black; some input is too extreme "
            "(cfg_scale, a template's scale or weights, a LoRA), or the dtype overflows (try float32)"
        )


def at_step(conditioning: Any, step: int, num_steps: int) -> Any:
    """Resolve a step-windowed KV cache (a dataclass's ``kv_cache``) to the tokens active at ``step``."""
    if isinstance(conditioning.kv_cache, ScheduledKVCache):
        return replace(conditioning, kv_cache=conditioning.kv_cache.at(step, num_steps))
    return conditioning


# Stacking CFG sides whose caches differ pads the shorter side with masked tokens that attention
# still visits. Beyond this fraction of a row's own tokens that wasted attention costs more than the
# batching saves (measured on CPU, 8 x 64 heads: 2048 padded tokens over 768 own tokens made a step
# 1.5x slower than two passes; small differences keep the batching gain), so two passes are used.
MAX_PADDING_FRACTION = 0.25


def batch_side_kv(
    cond_kv: KVCache | None, uncond_kv: KVCache | None, batch: int, own_tokens: int | None = None
) -> tuple[bool, KVCache | None]:
    """The two CFG sides' caches stacked along the batch (positive rows first): ``(ok, kv)``.

    Equal blocks and lengths stack as they are. Otherwise (typically templates on the positive side
    only) each block is zero-padded to the longer side and carries a third entry, the bool mask
    ``[2 * batch, L]`` of each row's real tokens, so one DiT call still computes both sides exactly:
    a row attends to its own side's tokens only. ``ok`` is False (run the sides as two passes) when
    the padding exceeds ``MAX_PADDING_FRACTION`` of ``own_tokens``, the DiT's own sequence length.
    """
    if not (cond_kv or uncond_kv):
        return True, None
    a, b = cond_kv or {}, uncond_kv or {}
    biased = any(len(e) > 2 for e in (*a.values(), *b.values()))  # a template strength != 1
    if a.keys() == b.keys() and all(a[n][0].shape[1] == b[n][0].shape[1] for n in a) and not biased:
        return True, {n: tuple(_stack(a[n][i], b[n][i], batch) for i in (0, 1)) for n in a}
    # per block: (positive tokens, negative tokens); a block one side lacks counts 0 there
    lengths = {
        n: tuple(side[n][0].shape[1] if n in side else 0 for side in (a, b)) for n in a.keys() | b.keys()
    }
    padding = max(abs(len_a - len_b) for len_a, len_b in lengths.values())
    if own_tokens is not None and padding > MAX_PADDING_FRACTION * own_tokens:
        return False, None
    stacked = {}
    for name, (len_a, len_b) in lengths.items():
        ref = (a.get(name) or b.get(name))[0]
        length = max(len_a, len_b)
        parts = [_padded(side.get(name), ref, length) for side in (a, b)]
        valid = torch.zeros(2 * batch, length, dtype=torch.bool, device=ref.device)
        valid[:batch, :len_a] = True
        valid[batch:, :len_b] = True
        bias = stacked_side_bias((a.get(name), b.get(name)), valid, batch)
        stacked[name] = (
            *(_stack(parts[0][i], parts[1][i], batch) for i in (0, 1)),
            valid if bias is None else bias,
        )
    return True, stacked


def _stack(a: Tensor, b: Tensor, batch: int) -> Tensor:
    return torch.cat([a.expand(batch, -1, -1, -1), b.expand(batch, -1, -1, -1)])


def _padded(entry: tuple[Tensor, Tensor] | None, ref: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """``(k, v)`` zero-padded along the tokens to ``length`` (a missing entry: all padding)."""
    if entry is None:
        empty = ref.new_zeros(1, length, *ref.shape[2:])
        return empty, empty
    pad = length - entry[0].shape[1]
    if pad == 0:
        return entry[0], entry[1]
    return tuple(torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1) for t in entry[:2])


def side_lora_rows(cond_lora: LoRACache | None, uncond_lora: LoRACache | None, batch: int):
    """Each side's LoRA with the rows of the stacked batch it applies to."""
    rows = ((cond_lora, slice(0, batch)), (uncond_lora, slice(batch, 2 * batch)))
    return tuple(r for r in rows if r[0])


@contextlib.contextmanager
def conditioning_loras(model: torch.nn.Module, lora: LoRACache | None, lora_rows=()) -> Iterator[None]:
    """A side's LoRA on the whole batch, plus per-row LoRAs of a stacked CFG batch, for one DiT call."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(applied_lora(model, lora))
        for row_lora, rows in lora_rows:
            stack.enter_context(applied_lora(model, row_lora, rows=rows))
        yield
