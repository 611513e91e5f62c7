"""TemplatePipeline: load any number of templates, run them once per call, merge, inject.

    templates = TemplatePipeline.from_pretrained(["path/or/modelscope-id", ...])
    image = templates(pipe, template_inputs=[{"model_id": 0, "scale": 0.7}], prompt="...", cfg_scale=4)[0]

Each input may also carry the framework's own keys: ``model_id``, ``step_start`` / ``step_end`` (the
fraction of the steps its KV applies to) and ``strength`` (default 1; 0 is the image without it, above
1 amplifies; see ``cache.apply_strength``). Templates run outside the denoising loop. Inputs are grouped per template and templates are visited
in round-robin order, so each is brought onto the accelerator once per call; with ``lazy_loading``
at most ``max_resident`` are there at any time. The negative side is skipped when ``cfg_scale`` is 1.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..loading.resolve import resolve_model_path
from ..pipelines.auto import BACKBONE_TITLES
from ..pipelines.common import PipelineInputError, default_device_and_dtype
from ..pipelines.kv_schedule import ScheduledKVCache, merge_kv_caches
from ..pipelines.lora import merge_loras
from .base import TemplateError
from .cache import (
    MERGEABLE_KEYS,
    TemplateCacheError,
    TemplateOutput,
    apply_strength,
    broadcast_cat,
    check_finite_output,
    merge_outputs,
    to_device,
    validate_output,
)
from .folder import LoadedTemplate
from .residency import (
    HOST_STORE,
    STAGE_THREADS,
    HostStore,
    OutputMemo,
    ResidencyScheduler,
    hash_inputs,
    stage_threads,
)
from .schema import RESERVED_KEYS, TemplateInputError, check_finite_inputs, read_strength
from .stream_merge import MERGE_ARENAS, KVOut, StreamedKV

logger = logging.getLogger(__name__)


class TemplateArgumentError(TemplateError, TypeError):
    """A ``TemplatePipeline`` argument of the wrong type or value (also a ``TypeError``, as it was)."""


@dataclass
class TemplateSlot:
    index: int
    name: str
    folder: Path


class TemplatePipeline:
    def __init__(
        self,
        slots: list[TemplateSlot],
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        lazy_loading: bool = False,
        trust_remote_code: bool = False,
        max_resident: int | None = None,
        memo_size: int = 32,
        host_store: HostStore | None = None,
        stage_threads: int | None = STAGE_THREADS,
    ):
        for flag, value in (("trust_remote_code", trust_remote_code), ("lazy_loading", lazy_loading)):
            if not isinstance(value, bool):
                raise TemplateArgumentError(f"{flag} must be True or False, got {value!r}")
        if max_resident is not None and (
            isinstance(max_resident, bool) or not isinstance(max_resident, int) or max_resident < 1
        ):
            raise TemplateArgumentError(f"max_resident must be an integer >= 1 or None, got {max_resident!r}")
        if isinstance(memo_size, bool) or not isinstance(memo_size, int) or memo_size < 0:
            raise TemplateArgumentError(f"memo_size must be an integer >= 0 (0: no memo), got {memo_size!r}")
        if stage_threads is not None and (
            isinstance(stage_threads, bool) or not isinstance(stage_threads, int) or stage_threads < 1
        ):
            raise TemplateArgumentError(
                f"stage_threads must be an integer >= 1 or None (torch's own setting), got {stage_threads!r}"
            )
        self.stage_threads = stage_threads
        names = [s.name for s in slots]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise TemplateArgumentError(
                f"template names {duplicates} are used twice; pass names=[...] to tell them apart"
            )
        self.slots = slots
        try:
            self.device, self.torch_dtype = default_device_and_dtype(device, torch_dtype)
        except PipelineInputError as e:
            raise TemplateArgumentError(str(e)) from e
        self.lazy_loading = lazy_loading
        self.trust_remote_code = trust_remote_code
        self.store = host_store or HOST_STORE
        self.scheduler = ResidencyScheduler(self.device, max_resident if lazy_loading else None)
        if lazy_loading and max_resident is None:
            self.scheduler.max_resident = 1
        self.memo = OutputMemo(memo_size)
        self._merge_memo: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        # the merge memory, reused by the next call (of any pipeline) once a call's result is dropped
        self.merge_arenas = MERGE_ARENAS
        if not lazy_loading:  # eager: everything read now and kept on the device
            with self._threads():
                for slot in slots:
                    self.scheduler.acquire(slot.name, self._load(slot))

    @classmethod
    def from_pretrained(
        cls,
        sources: Sequence[str | os.PathLike] | str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        lazy_loading: bool = False,
        trust_remote_code: bool = False,
        *,
        names: Sequence[str] | None = None,
        max_resident: int | None = None,
        memo_size: int = 32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
        host_store: HostStore | None = None,
        stage_threads: int | None = STAGE_THREADS,
    ) -> TemplatePipeline:
        """``sources``: local template folders or ModelScope ids; ``names`` override the folder names."""
        sources = _as_list(sources, "sources", (str, os.PathLike), "template folders or ModelScope ids")
        if names is not None:
            names = _as_list(names, "names", (str,), "template names")
            if len(names) != len(sources):
                raise TemplateArgumentError(f"names has {len(names)} entries for {len(sources)} sources")
            if any(not n for n in names):
                raise TemplateArgumentError(f"names must be non-empty strings, got {names!r}")
        slots = []
        for i, source in enumerate(sources):
            folder = resolve_model_path(source, revision=revision, cache_dir=cache_dir, offline=offline)
            slots.append(TemplateSlot(i, names[i] if names else _default_name(source, folder), folder))
        return cls(
            slots,
            torch_dtype,
            device,
            lazy_loading,
            trust_remote_code,
            max_resident,
            memo_size,
            host_store,
            stage_threads,
        )

    # -- running ----------------------------------------------------------------------------------

    def _threads(self):
        """The stage's CPU thread limit (``stage_threads``) as a context."""
        return stage_threads(self.device, self.stage_threads)

    def _load(self, slot: TemplateSlot) -> LoadedTemplate:
        return self.store.get(slot.folder, self.torch_dtype, self.trust_remote_code)

    def slot_for(self, model_id: Any) -> TemplateSlot:
        if isinstance(model_id, bool) or not isinstance(model_id, (int, str)):
            raise TemplateInputError(f"model_id must be an index or a template name, got {model_id!r}")
        if isinstance(model_id, int):
            if not 0 <= model_id < len(self.slots):
                raise TemplateInputError(
                    f"model_id {model_id} is out of range: {len(self.slots)} template(s) loaded "
                    f"({[s.name for s in self.slots]})"
                )
            return self.slots[model_id]
        for slot in self.slots:
            if slot.name == model_id:
                return slot
        raise TemplateInputError(
            f"unknown model_id {model_id!r}; loaded templates are {[s.name for s in self.slots]}"
        )

    def run_templates(
        self,
        pipe,
        template_inputs: Sequence[dict],
        negative_template_inputs: Sequence[dict] = (),
        on_output: Callable[[str, TemplateOutput], TemplateOutput] | None = None,
        kv_out: Callable[[str], KVOut] | None = None,
    ) -> tuple[list[TemplateOutput], list[TemplateOutput]]:
        """Run every input through its template; returns the outputs of each CFG side, in input order.
        ``on_output(side, output)``, called as each output is made (in merge order), may replace it;
        ``kv_out(side)``: where that output's full-window KV will be merged, handed to template models
        that write there (``writes_kv_out``)."""
        _check_pipe(pipe)
        sides = {
            "positive": _input_list(template_inputs, "template_inputs"),
            "negative": _input_list(negative_template_inputs, "negative_template_inputs"),
        }
        jobs: dict[str, list[tuple[str, int, TemplateSlot, dict]]] = {}
        for side, inputs in sides.items():
            for position, item in enumerate(inputs):
                if not isinstance(item, dict):
                    raise TemplateInputError(
                        f"{side} template input #{position} must be a dict like "
                        f"{{'model_id': 0, ...}}, got {item!r} ({type(item).__name__})"
                    )
                slot = self.slot_for(item.get("model_id", 0))
                jobs.setdefault(slot.name, []).append((side, position, slot, item))

        results: dict[str, list[TemplateOutput | None]] = {s: [None] * len(v) for s, v in sides.items()}
        order: dict[str, list[tuple[int, int]]] = {s: [] for s in sides}  # (slot index, position) per output
        try:
            with self._threads():  # one visit per template, in slot order: outputs come in the merge's order
                for name, items in sorted(jobs.items(), key=lambda job: job[1][0][2].index):
                    slot = items[0][2]
                    template = self.scheduler.acquire(name, self._load(slot))
                    for side, position, _, item in items:
                        out = self._run_one(pipe, slot, template, item, kv_out(side) if kv_out else None)
                        results[side][position] = on_output(side, out) if on_output else out
                        order[side].append((slot.index, position))
        finally:
            if self.lazy_loading:
                self.scheduler.release_all()
        # merge in a canonical order (by template, then input position): the order the user listed
        # templates in never changes a single bit of the result
        canonical = {s: [results[s][p] for _, p in sorted(order[s])] for s in sides}
        return canonical["positive"], canonical["negative"]

    def _run_one(
        self, pipe, slot: TemplateSlot, template: LoadedTemplate, item: dict, kv_out: KVOut | None = None
    ) -> TemplateOutput:
        start, end = (_step_fraction(item, key, default, slot.name) for key, default in STEP_KEYS)
        if not 0.0 <= start < end <= 1.0:
            raise TemplateInputError(
                f"template {slot.name!r}: step_start={start}, step_end={end}; need 0 <= step_start < step_end <= 1"
            )
        strength = read_strength(item, f"template {slot.name!r}")
        check_base(slot.name, template, pipe)
        inputs = {k: v for k, v in item.items() if k not in RESERVED_KEYS}
        if template.schema is not None:
            inputs = template.schema.validate(inputs, f"template {slot.name!r}")
        else:  # undeclared inputs: at least no NaN / inf
            check_finite_inputs(inputs, f"template {slot.name!r}")
        key = (str(slot.folder.resolve()), str(self.torch_dtype), id(pipe), hash_inputs(inputs))
        cache = self.memo.get(key)
        if cache is None:
            writes = kv_out is not None and getattr(template.model, "writes_kv_out", False)
            # only KV that is merged as it is may be written in place: a window or strength 0 keeps it apart
            extra = {"kv_out": kv_out} if writes and (start, end) == (0.0, 1.0) and strength > 0 else {}
            with torch.no_grad():
                features = template.model.process_inputs(pipe=pipe, **inputs)
                cache = template.model(pipe=pipe, **features, **extra)
            if not isinstance(cache, dict):
                raise TemplateCacheError(
                    f"template {slot.name!r} returned {type(cache).__name__}; forward must return a dict"
                )
            cache = to_device(cache, pipe.device, pipe.torch_dtype)
            check_finite_output(slot.name, cache)  # once per computed cache; memo hits were checked
            self.memo.put(key, cache)
        memo_key = key if self.memo.max_entries > 0 else None
        return TemplateOutput(slot.name, cache, start, end, memo_key, strength)

    @torch.no_grad()
    def __call__(self, pipe, template_inputs: Sequence[dict] | None = None, negative_template_inputs: Sequence[dict] | None = None, **pipe_kwargs):  # fmt: skip
        """Run the templates, merge their caches into pipeline arguments, and call ``pipe``."""
        return pipe(**self.prepare(pipe, template_inputs, negative_template_inputs, **pipe_kwargs))

    @torch.no_grad()
    def prepare(self, pipe, template_inputs: Sequence[dict] | None = None, negative_template_inputs: Sequence[dict] | None = None, **pipe_kwargs) -> dict[str, Any]:  # fmt: skip
        """The template stage alone: ``pipe_kwargs`` with the templates' merged caches added (what
        ``__call__`` passes to ``pipe``); useful to reuse caches or time the stage."""
        with self._threads():
            return self._prepare(pipe, template_inputs, negative_template_inputs, pipe_kwargs)

    def _prepare(self, pipe, template_inputs, negative_template_inputs, pipe_kwargs: dict) -> dict[str, Any]:
        _check_pipe(pipe)
        cfg_scale = pipe_kwargs.get("cfg_scale")
        if cfg_scale is None:  # the pipeline's own default (Z-Image: per variant)
            cfg_scale = pipe.default_cfg_scale
        negative = negative_template_inputs if cfg_scale != 1.0 else None  # the negative side would be unused
        batch = _batch_size(pipe_kwargs.get("prompt"))
        accepted = {"positive": pipe.accepted_cache_keys, "negative": pipe.negative_cache_keys}
        inputs = {"positive": template_inputs or [], "negative": negative or []}

        def streamed() -> StreamedKV:
            return StreamedKV(
                {side: len(items) for side, items in inputs.items()},
                lambda side, out: validate_output(out, pipe.dit, set(accepted[side]), batch),
                self.merge_arenas,
            )

        # memo off: nothing keeps an output, so KV is merged as each one arrives (in place where it can)
        stream = streamed() if self.memo.max_entries == 0 else None
        computed_before = self.memo.misses
        positive_out, negative_out = self.run_templates(
            pipe,
            inputs["positive"],
            inputs["negative"],
            stream.add if stream else None,
            stream.kv_out if stream else None,
        )
        outputs = {"positive": positive_out, "negative": negative_out}
        # a call whose every output came from the memo may find its merge kept from an identical call
        from_memo = stream is None and self.memo.misses == computed_before
        keys = {side: _merge_key(outs) if from_memo else None for side, outs in outputs.items()}
        kept = {side: self._merge_memo.get(key) if key else None for side, key in keys.items()}
        if stream is None:  # memo on: the outputs stay in the memo; their KV is copied into the reused
            stream = streamed()  # merge memory, not into fresh memory
            for side, outs in outputs.items():
                if kept[side] is None:
                    outputs[side] = [stream.add(side, out) for out in outs]
        kwargs = dict(pipe_kwargs)
        for prefix, side in (("", "positive"), ("negative_", "negative")):
            for out in outputs[side]:  # a kept merge too: this call's pipeline or batch may differ
                validate_output(out, pipe.dit, set(accepted[side]), batch)
            merged = kept[side]
            if merged is None:
                merged = _merge_side(stream.outputs(side, outputs[side])) if outputs[side] else {}
                if keys[side]:
                    self._merge_memo[keys[side]] = merged
                    while len(self._merge_memo) > MERGE_MEMO_SIZE:
                        self._merge_memo.popitem(last=False)
            else:
                self._merge_memo.move_to_end(keys[side])
            for key, value in merged.items():
                name = prefix + key
                if kwargs.get(name) is not None:  # passing None is not passing a value
                    kwargs[name] = _merge_with_user(key, kwargs[name], value, name)
                else:
                    kwargs[name] = value
        return kwargs


def _merge_key(outputs: list[TemplateOutput]) -> tuple | None:
    """What determines the merge of ``outputs`` (each output's memo key, window and strength), or None
    where it is unknown: merging copies every KV token once, which costs as much as running small
    templates, so the merge of memoized outputs is kept for an identical call."""
    if not outputs or any(o.key is None for o in outputs):
        return None
    return tuple((o.key, o.step_start, o.step_end, o.strength) for o in outputs)


MERGE_MEMO_SIZE = 4  # merged caches kept (one per recent combination of template outputs)

STEP_KEYS = (("step_start", 0.0), ("step_end", 1.0))


def check_base(name: str, template: LoadedTemplate, pipe) -> None:
    """Refuse a template built for another backbone than ``pipe``'s, naming both base models."""
    wanted = template.spec.base_backbone if template.spec is not None else None
    have = getattr(pipe, "backbone", None)
    if not wanted or not have or wanted == have:
        return
    want_title, have_title = (BACKBONE_TITLES.get(b, b) for b in (wanted, have))
    trained_on = template.base_model or "an unnamed base model"
    this = getattr(pipe, "name_or_path", None) or f"a {type(pipe).__name__}"
    raise TemplateError(
        f"template {name!r} was built for base model {trained_on!r} ({want_title}), "
        f"but this pipeline's base model is {this!r} ({have_title}); load it on a {want_title} pipeline"
    )


def _merge_side(outputs: list[TemplateOutput]) -> dict[str, Any]:
    """Merge one side, each output at its strength; KV of templates with a step window becomes a
    ScheduledKVCache."""
    outputs = [o for o in map(apply_strength, outputs) if o is not None]
    full = [o for o in outputs if (o.step_start, o.step_end) == (0.0, 1.0)]
    windowed = [o for o in outputs if (o.step_start, o.step_end) != (0.0, 1.0)]
    merged = merge_outputs(full + [TemplateOutput(o.template, {k: v for k, v in o.cache.items() if k != "kv_cache"}) for o in windowed]).values  # fmt: skip
    windowed_kv = [o for o in windowed if "kv_cache" in o.cache]
    if windowed_kv:
        entries = [(merged["kv_cache"], 0.0, 1.0)] if "kv_cache" in merged else []
        entries += [(o.cache["kv_cache"], o.step_start, o.step_end) for o in windowed_kv]
        merged["kv_cache"] = ScheduledKVCache(entries)
    return merged


def _merge_with_user(key: str, user: Any, template: Any, name: str) -> Any:
    if key not in MERGEABLE_KEYS:
        raise TemplateCacheError(
            f"{name!r} was passed directly and also produced by a template; pass it only once"
        )
    if key == "kv_cache":
        if isinstance(template, ScheduledKVCache) or isinstance(user, ScheduledKVCache):
            user_entries = user.entries if isinstance(user, ScheduledKVCache) else [(user, 0.0, 1.0)]
            template_entries = (
                template.entries if isinstance(template, ScheduledKVCache) else [(template, 0.0, 1.0)]
            )
            return ScheduledKVCache(user_entries + template_entries)
        return merge_kv_caches([user, template])
    if key == "lora":
        return merge_loras([user, template])
    return broadcast_cat([user, template], 1)


# what a base pipeline declares for templates (``pipelines.sampling.FamilyPipeline`` has them all)
PIPE_CONTRACT = ("dit", "device", "accepted_cache_keys", "negative_cache_keys", "default_cfg_scale")


def _check_pipe(pipe: Any) -> None:
    missing = [name for name in PIPE_CONTRACT if not hasattr(pipe, name)]
    if not callable(pipe) or missing:
        raise TemplateArgumentError(
            f"pipe must be a base pipeline (Flux2ImagePipeline, ZImagePipeline, ...), got {type(pipe).__name__}"
            + (f" (it lacks {missing})" if missing else "")
        )


def _as_list(value: Any, name: str, kinds: tuple[type, ...], what: str) -> list:
    """``value`` (one item or a list / tuple of them) as a list, each item of ``kinds``."""
    items = [value] if isinstance(value, kinds) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, kinds) for i in items):
        raise TemplateArgumentError(f"{name} must be one or a list of {what} (strings), got {value!r}")
    return list(items)


def _input_list(inputs: Any, name: str) -> list:
    if inputs is None:
        return []
    if isinstance(inputs, Mapping):
        raise TemplateInputError(
            f"{name} must be a list of dicts, one per template use, got a dict; wrap it: [{inputs!r}]"
        )
    if not isinstance(inputs, (list, tuple)):
        raise TemplateInputError(
            f"{name} must be a list of dicts like [{{'model_id': 0, ...}}], got {inputs!r}"
        )
    return list(inputs)


def _step_fraction(item: Mapping, key: str, default: float, template: str) -> float:
    value = item.get(key, default)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TemplateInputError(f"template {template!r}: {key} must be a number in [0, 1], got {value!r}")
    return float(value)


def _batch_size(prompt: Any) -> int | None:
    if isinstance(prompt, str):
        return 1
    return len(prompt) if isinstance(prompt, list) else None


def _default_name(source: str | os.PathLike, folder: Path) -> str:
    return str(source) if not Path(source).exists() else folder.name
