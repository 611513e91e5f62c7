"""Reference-image (``edit_image``) tokens as keys and values computed once per call, not every step.

Two ways, both for FLUX.2-klein, chosen per call by ``EditPositions``:

- **exact** (klein-9B-KV, whose folder names ``Flux2KleinKVPipeline``): that model's reference tokens
  attend only to themselves and are modulated at a fixed timestep 0, so their keys and values never
  depend on the step, the text or the latents. ``Flux2DiT.reference_kv`` computes them once; every
  step appends them to each block's attention, like a template's KV (diffusers' extract/cached modes).
- **approximate** (``reuse_edit_kv=True`` on any other klein): the first DiT pass of each CFG side
  runs the reference tokens in the sequence as usual and records their keys and values; later steps
  leave the tokens out and append the recording. The recording is what step 0 saw (noise, sigma 1),
  so the result differs from the exact recomputation: ``benchmarks/edit_kv_reuse.py`` measures how much.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..backbones.attention import KVCache

KV_MODEL_PIPELINE = "Flux2KleinKVPipeline"  # model_index.json's _class_name of klein-9B-KV
REFERENCE_TIMESTEP = 0.0  # the sigma the KV model modulates reference tokens with


def is_reference_kv_model(model_index: Mapping) -> bool:
    """Whether a FLUX.2 folder's ``model_index.json`` names the KV pipeline (diffusers 0.42 marks the
    model there: its transformer config is an ordinary ``Flux2Transformer2DModel``'s)."""
    return model_index.get("_class_name") == KV_MODEL_PIPELINE


class JoinedKV(Mapping):
    """A template cache with reference keys/values appended per block, joined when a block asks for
    its entry (so only one block's joined copy exists at a time, and nothing is copied without
    templates). A third entry grows by the reference tokens: valid for every row (stacked CFG sides'
    bool mask), at logit bias 0 (a template's log-strength)."""

    def __init__(self, kv_cache: KVCache | None, reference: KVCache):
        self.kv_cache, self.reference = kv_cache or {}, reference

    def __getitem__(self, name: str):
        ref = self.reference.get(name)
        own = self.kv_cache.get(name)
        if own is None or ref is None:
            if own is None and ref is None:
                raise KeyError(name)
            return own if ref is None else ref
        batch = max(own[0].shape[0], ref[0].shape[0])
        k, v = (
            torch.cat([a.expand(batch, -1, -1, -1), b.to(a.dtype).expand(batch, -1, -1, -1)], dim=1)
            for a, b in zip(own[:2], ref)
        )
        if len(own) == 2:
            return k, v
        # the third entry covers the reference tokens too: valid (bool) rows, or a 0 logit bias
        extra = own[2]
        fill = extra.new_ones if extra.dtype == torch.bool else extra.new_zeros
        return k, v, torch.cat([extra, fill(extra.shape[0], ref[0].shape[1])], dim=1)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self.kv_cache, *self.reference]))

    def __len__(self) -> int:
        return len(self.kv_cache.keys() | self.reference.keys())


@dataclass
class EditPositions:
    """What every DiT call of one FLUX.2 call shares besides the conditioning (built once per call)."""

    ids: Tensor  # position ids: the image's, then the reference tokens' when they run in the sequence
    edit_tokens: Tensor | None  # reference tokens that run in the sequence (None: none, or reused)
    n_img: int  # image tokens (the DiT output rows that are the prediction)
    reference_kv: KVCache | None = None  # exact: the KV model's reference keys/values, every step
    reuse: bool = False  # approximate: record on each stream's first pass, reuse afterwards
    recorded: dict = field(default_factory=dict)  # (prompt tensor id, batch) -> (prompt, recording)

    def call_parts(self, hidden: Tensor, kv_cache: KVCache | None, prompt: Tensor):
        """``(hidden, ids, kv_cache, record_key)`` for one DiT call; ``record_key`` is not None when this
        call must record the reference tokens' keys/values (``store`` them after the call)."""
        if self.reference_kv is not None:
            return hidden, self.ids, JoinedKV(kv_cache, self.reference_kv), None
        if not self.reuse or self.edit_tokens is None:
            return hidden, self.ids, kv_cache, None
        key = (id(prompt), hidden.shape[0])
        found = self.recorded.get(key)
        if found is None:  # this stream's first pass: run the reference tokens, record them
            return hidden, self.ids, kv_cache, key
        return hidden[:, : self.n_img], self.ids[: self.n_img], JoinedKV(kv_cache, found[1]), None

    @contextlib.contextmanager
    def recording(self, dit: nn.Module, key, prompt: Tensor) -> Iterator[None]:
        """Record the reference tokens' keys/values of the DiT call inside (``key`` None: nothing)."""
        if key is None:
            yield
            return
        with dit.recording_kv(self.edit_tokens.shape[1]) as recorder:
            yield
        kv = dit.kv_of_record(recorder)
        if kv is not None:  # a pass that skipped blocks (a step cache) records nothing
            self.recorded[key] = (prompt, kv)  # the prompt tensor kept alive so its id stays its own
