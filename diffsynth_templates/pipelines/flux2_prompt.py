"""FLUX.2-klein prompt encoding: chat template -> tokens -> Qwen3 hidden states -> DiT text tokens.

What the official pipeline (diffusers ``Flux2KleinPipeline.encode_prompt``) does, reproduced without
transformers:

1. wrap each prompt in Qwen3's chat template as a single user turn with thinking disabled;
2. tokenize, truncate to ``max_sequence_length`` and always pad to exactly that length (on the
   right, with ``<|endoftext|>``), so every prompt gives ``max_sequence_length`` tokens;
3. run the text encoder with the padding mask and take hidden states 9, 18 and 27 (index 0 is the
   embedding output), concatenated per token along the features: width ``3 * hidden_size``;
4. text position ids ``[B, L, 4]`` are ``(0, 0, 0, l)``: only the last RoPE axis moves.

Pad positions are not dropped: the DiT sees all ``max_sequence_length`` tokens, pads included.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import Tensor

from ..backbones.qwen3 import Qwen3TextEncoder
from ..loading import CheckpointError
from .common import PipelineInputError

logger = logging.getLogger(__name__)

KLEIN_HIDDEN_STATE_LAYERS = (9, 18, 27)
DEFAULT_MAX_SEQUENCE_LENGTH = 512
DEFAULT_PAD_TOKEN = "<|endoftext|>"  # Qwen's pad token (tokenizer_config.json, and transformers' default)


def qwen3_chat_prompt(prompt: str, thinking: bool) -> str:
    """Qwen3's chat template for one user turn with the generation prompt; ``thinking=False`` adds the
    empty ``<think>`` block that switches thinking off. The one chat-prompt builder of both families."""
    turn = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return turn if thinking else turn + "<think>\n\n</think>\n\n"


def chat_prompt(prompt: str) -> str:
    """What FLUX.2-klein sends: one user turn, generation prompt added, thinking disabled."""
    return qwen3_chat_prompt(prompt, thinking=False)


def pad_or_truncate(
    ids: Sequence[int], length: int, pad_id: int, padding_side: str = "right"
) -> tuple[list[int], list[int]]:
    """Cut ``ids`` to ``length`` (keeping the start) and pad to exactly ``length``; returns ids and mask."""
    ids = list(ids[:length])
    pad = length - len(ids)
    mask = [1] * len(ids)
    if padding_side == "right":
        return ids + [pad_id] * pad, mask + [0] * pad
    return [pad_id] * pad + ids, [0] * pad + mask


def text_position_ids(batch: int, length: int, device: str | torch.device | None = None) -> Tensor:
    """Position ids ``[B, L, 4]`` (int64) of text tokens: ``(t, h, w, l) = (0, 0, 0, l)``."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids.expand(batch, -1, -1).clone()


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Read ``tokenizer.json`` from a ``tokenizer/`` folder (or from a pipeline root holding one)."""
    path = _tokenizer_folder(folder) / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise CheckpointError(
            f"{str(path)!r} is not a valid tokenizers JSON file ({e}); download it again"
        ) from e


def read_tokenizer_settings(folder: str | os.PathLike) -> tuple[str, str]:
    """``(pad_token, padding_side)`` from ``tokenizer_config.json`` when present, else Qwen's defaults."""
    path = _tokenizer_folder(folder) / "tokenizer_config.json"
    if not path.is_file():
        return DEFAULT_PAD_TOKEN, "right"
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e})") from e
    pad = config.get("pad_token") or DEFAULT_PAD_TOKEN
    pad = pad["content"] if isinstance(pad, dict) else pad  # older files store an AddedToken dict
    return pad, config.get("padding_side", "right")


def _tokenizer_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return folder
    if (folder / "tokenizer" / "tokenizer.json").is_file():
        return folder / "tokenizer"
    raise CheckpointError(
        f"no tokenizer.json in {str(folder)!r} (nor in its tokenizer/ subfolder); pass the model's "
        "tokenizer/ folder, which must hold the tokenizers-format tokenizer.json"
    )


def prepare_tokenizer(tokenizer: Tokenizer, pad_token: str, padding_side: str) -> tuple[Tokenizer, int]:
    """Check the padding settings; return a tokenizer that neither pads nor truncates, and the pad id.

    Padding and truncation are done by the prompt encoders themselves (to ``max_sequence_length``);
    a private copy keeps the caller's tokenizer untouched.
    """
    if padding_side not in ("right", "left"):
        raise PipelineInputError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise PipelineInputError(
            f"pad token {pad_token!r} is not in the tokenizer's vocabulary; pass pad_token="
        )
    if tokenizer.padding is not None or tokenizer.truncation is not None:
        tokenizer = Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_padding()
        tokenizer.no_truncation()
    return tokenizer, pad_id


class UnknownWordWarner:
    """Warns, once per prompt, about prompt words a tokenizer with an unknown token cannot represent.

    A word-level tokenizer (the toy model's) maps every word outside its vocabulary to ``[UNK]``
    silently, so a prompt can lose its meaning without a word; byte-level BPE (Qwen's) has no unknown
    token and is never checked.
    """

    MAX_REMEMBERED = 256

    def __init__(self, tokenizer: Tokenizer):
        unk = getattr(tokenizer.model, "unk_token", None)
        self.unk = unk if isinstance(unk, str) and unk else None
        self.unk_id = tokenizer.token_to_id(self.unk) if self.unk else None
        self.warned: set[str] = set()

    def check(self, prompts: Sequence[str], texts: Sequence[str], encodings: Sequence) -> None:
        """``texts``: what was tokenized for each prompt (e.g. the chat-wrapped prompt)."""
        if self.unk_id is None:
            return
        for prompt, text, e in zip(prompts, texts, encodings):
            if prompt in self.warned or self.unk_id not in e.ids:
                continue
            words = dict.fromkeys(text[a:b] for i, (a, b) in zip(e.ids, e.offsets) if i == self.unk_id)
            logger.warning(
                "prompt words not in the tokenizer's vocabulary (they become %s): %s (prompt %.60r)",
                self.unk,
                ", ".join(repr(w) for w in words),
                prompt,
            )
            if len(self.warned) < self.MAX_REMEMBERED:
                self.warned.add(prompt)


class Flux2PromptEncoder:
    """Turns prompts into FLUX.2-klein text tokens with a Qwen3 encoder (frozen; no gradients)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        text_encoder: Qwen3TextEncoder,
        *,
        hidden_state_layers: Sequence[int] = KLEIN_HIDDEN_STATE_LAYERS,
        pad_token: str = DEFAULT_PAD_TOKEN,
        padding_side: str = "right",
    ):
        tokenizer, pad_id = prepare_tokenizer(tokenizer, pad_token, padding_side)
        n_states = text_encoder.config.num_hidden_layers + 1
        bad = [i for i in hidden_state_layers if not -n_states <= i < n_states]
        if bad or len(hidden_state_layers) == 0:
            raise PipelineInputError(
                f"hidden_state_layers {tuple(hidden_state_layers)} do not fit a text encoder with "
                f"{n_states} hidden states (0 = embeddings ... {n_states - 1}); out of range: {bad}"
            )
        self.tokenizer = tokenizer
        self.unknown_words = UnknownWordWarner(tokenizer)
        self.text_encoder = text_encoder
        self.hidden_state_layers = tuple(hidden_state_layers)
        self.pad_id = pad_id
        self.padding_side = padding_side

    @property
    def embed_dim(self) -> int:
        return len(self.hidden_state_layers) * self.text_encoder.config.hidden_size

    @classmethod
    def from_pretrained(
        cls,
        root: str | os.PathLike,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        **kwargs,
    ) -> Flux2PromptEncoder:
        """Load ``tokenizer/`` and ``text_encoder/`` of an official FLUX.2-klein folder."""
        root = Path(root)
        pad_token, padding_side = read_tokenizer_settings(root / "tokenizer")
        kwargs = {"pad_token": pad_token, "padding_side": padding_side, **kwargs}
        tokenizer = load_tokenizer(root / "tokenizer")
        text_encoder = Qwen3TextEncoder.from_pretrained(
            root / "text_encoder", torch_dtype=torch_dtype, device=device
        )
        return cls(tokenizer, text_encoder, **kwargs)

    def tokenize(
        self, prompts: str | Sequence[str], max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    ) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both ``[B, max_sequence_length]`` int64 on the CPU."""
        prompts = _check_prompts(prompts)
        _check_length(max_sequence_length)
        texts = [chat_prompt(p) for p in prompts]
        encodings = self.tokenizer.encode_batch(texts)
        self.unknown_words.check(prompts, texts, encodings)
        rows = [
            pad_or_truncate(e.ids, max_sequence_length, self.pad_id, self.padding_side) for e in encodings
        ]
        for prompt, e in zip(prompts, encodings):
            if len(e.ids) > max_sequence_length:
                logger.warning(
                    "prompt of %d tokens truncated to max_sequence_length=%d: %.60r...",
                    len(e.ids),
                    max_sequence_length,
                    prompt,
                )
        input_ids = torch.tensor([ids for ids, _ in rows], dtype=torch.long)
        attention_mask = torch.tensor([mask for _, mask in rows], dtype=torch.long)
        return input_ids, attention_mask

    @torch.no_grad()
    def encode(
        self,
        prompts: str | Sequence[str],
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``(prompt_embeds [B, L, len(layers) * hidden], text_ids [B, L, 4])`` with L = max_sequence_length.

        ``device`` / ``dtype`` of the embeddings default to the text encoder's.
        """
        input_ids, attention_mask = self.tokenize(prompts, max_sequence_length)
        encoder_device = self.text_encoder.device
        states = self.text_encoder(
            input_ids.to(encoder_device),
            attention_mask.to(encoder_device),
            output_hidden_states_layers=self.hidden_state_layers,
        )
        device = encoder_device if device is None else device
        dtype = self.text_encoder.dtype if dtype is None else dtype
        # per token: [h_9, h_18, h_27] side by side
        prompt_embeds = torch.cat(states, dim=-1).to(device=device, dtype=dtype)
        text_ids = text_position_ids(prompt_embeds.shape[0], prompt_embeds.shape[1], device)
        return prompt_embeds, text_ids


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise PipelineInputError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise PipelineInputError(
                f"prompt {i} is a {type(p).__name__}, not a string; pass text (use '' for none)"
            )
    return list(prompts)


def _check_length(max_sequence_length: int) -> None:
    if (
        isinstance(max_sequence_length, bool)
        or not isinstance(max_sequence_length, int)
        or max_sequence_length < 1
    ):
        raise PipelineInputError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}")
