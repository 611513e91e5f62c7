"""FLUX.2-klein prompt encoding against diffusers' Flux2KleinPipeline (test-only reference).

The reference runs on the same folder the way diffusers loads the official one: transformers'
``AutoTokenizer`` (a ``Qwen2Tokenizer``, chat template applied by Jinja) and ``Qwen3ForCausalLM``,
through the pipeline's own static prompt-embedding and text-id methods.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from diffsynth_templates.backbones.qwen3 import Qwen3TextEncoder
from diffsynth_templates.loading import CheckpointError
from diffsynth_templates.pipelines.flux2_prompt import (
    Flux2PromptEncoder,
    chat_prompt,
    load_tokenizer,
    pad_or_truncate,
    text_position_ids,
)
from tests.backbones.test_qwen3 import tiny_hf_qwen3

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

# Qwen's pre-tokenizer split (the one transformers' Qwen2Tokenizer rebuilds the tokenizer with)
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# The parts of Qwen3's chat template a prompt goes through (system turn, user turn, generation prompt)
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "",
    "cafe\u0301 🐱 at night,\n\nrain <|im_end|> and <think> neon",  # NFD accent, emoji, special text
    "a red car " * 12,  # long enough to be truncated at small lengths
]


def tiny_qwen_tokenizer() -> Tokenizer:
    """A byte-level BPE with Qwen's normalizer, split, specials and added think tokens."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = ["a photo of a cat sitting on a windowsill", "a red car parked in the street at night"] * 20
    trainer = BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ["<think>", "</think>"]])
    return tok


@pytest.fixture(scope="module")
def klein_root(tmp_path_factory) -> Path:
    """An official-layout root: tokenizer/ (tokenizer.json + tokenizer_config.json) and text_encoder/."""
    root = tmp_path_factory.mktemp("klein")
    tok = tiny_qwen_tokenizer()
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 131072,
        "chat_template": QWEN3_CHAT_TEMPLATE,
    }
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    tiny_hf_qwen3(vocab_size=tok.get_vocab_size(), seed=5).save_pretrained(
        root / "text_encoder", max_shard_size="100KB"
    )
    return root


@pytest.fixture(scope="module")
def reference(klein_root):
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(klein_root / "tokenizer")
    hf_encoder = transformers.Qwen3ForCausalLM.from_pretrained(klein_root / "text_encoder").eval()
    return hf_tokenizer, hf_encoder


@pytest.fixture(scope="module")
def encoder(klein_root) -> Flux2PromptEncoder:
    return Flux2PromptEncoder.from_pretrained(klein_root)


def diffusers_encode(reference, prompts, max_sequence_length):
    from diffusers import Flux2KleinPipeline

    hf_tokenizer, hf_encoder = reference
    with torch.no_grad():
        embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=hf_encoder,
            tokenizer=hf_tokenizer,
            prompt=prompts,
            max_sequence_length=max_sequence_length,
        )
    return embeds, Flux2KleinPipeline._prepare_text_ids(embeds)


def test_chat_prompt_matches_qwen3_template(reference):
    hf_tokenizer, _ = reference
    for prompt in PROMPTS:
        text = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        assert chat_prompt(prompt) == text


@pytest.mark.parametrize("max_sequence_length", [16, 64, 512])
def test_token_ids_match_transformers(reference, encoder, max_sequence_length):
    hf_tokenizer, _ = reference
    input_ids, attention_mask = encoder.tokenize(PROMPTS, max_sequence_length)
    for row, prompt in enumerate(PROMPTS):
        ref = hf_tokenizer(
            chat_prompt(prompt), padding="max_length", truncation=True, max_length=max_sequence_length
        )
        assert input_ids[row].tolist() == ref["input_ids"]
        assert attention_mask[row].tolist() == ref["attention_mask"]
    assert encoder.pad_id == hf_tokenizer.pad_token_id


@pytest.mark.parametrize("max_sequence_length", [None, 24])  # None: both sides' default (512)
def test_encode_matches_diffusers(reference, encoder, max_sequence_length):
    length = max_sequence_length or 512
    ref_embeds, ref_ids = diffusers_encode(reference, PROMPTS, length)
    kwargs = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    embeds, text_ids = encoder.encode(PROMPTS, **kwargs)
    assert embeds.shape == ref_embeds.shape == (len(PROMPTS), length, 3 * 32)
    assert embeds.dtype == ref_embeds.dtype
    assert (embeds - ref_embeds).abs().max().item() <= 1e-5
    assert text_ids.dtype == ref_ids.dtype and torch.equal(text_ids, ref_ids)


def test_single_string_prompt_and_dtype(encoder, reference):
    embeds, text_ids = encoder.encode("a cat", max_sequence_length=8, dtype=torch.bfloat16)
    ref_embeds, _ = diffusers_encode(reference, ["a cat"], 8)
    assert embeds.shape == (1, 8, 96) and embeds.dtype == torch.bfloat16
    assert torch.equal(embeds, ref_embeds.to(torch.bfloat16))
    assert text_ids.shape == (1, 8, 4)


def test_embeddings_are_the_requested_layers_side_by_side(encoder):
    input_ids, mask = encoder.tokenize(["a cat"], 12)
    h9, h18, h27 = encoder.text_encoder(input_ids, mask, output_hidden_states_layers=(9, 18, 27))
    embeds, _ = encoder.encode(["a cat"], max_sequence_length=12)
    assert torch.equal(embeds, torch.cat([h9, h18, h27], dim=-1))


@pytest.mark.parametrize(
    "prompts, length, needle",
    [
        (["ok", 3], 16, "prompt 1 is a int"),
        ([None], 16, "prompt 0 is a NoneType"),
        ([], 16, "non-empty"),
        (["ok"], 0, "max_sequence_length"),
        (["ok"], 2.5, "max_sequence_length"),
    ],
)
def test_bad_inputs_raise(encoder, prompts, length, needle):
    with pytest.raises(ValueError, match=needle):
        encoder.encode(prompts, max_sequence_length=length)


def test_load_tokenizer_accepts_root_and_reports_missing(klein_root, tmp_path):
    assert (
        load_tokenizer(klein_root).get_vocab_size()
        == load_tokenizer(klein_root / "tokenizer").get_vocab_size()
    )
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizers JSON"):
        load_tokenizer(tmp_path)


def test_unknown_pad_token_and_layers_raise(klein_root):
    tokenizer = load_tokenizer(klein_root)
    text_encoder = Qwen3TextEncoder.from_pretrained(klein_root / "text_encoder")
    with pytest.raises(ValueError, match="<pad>"):
        Flux2PromptEncoder(tokenizer, text_encoder, pad_token="<pad>")
    with pytest.raises(ValueError, match="out of range: \\[40\\]"):
        Flux2PromptEncoder(tokenizer, text_encoder, hidden_state_layers=(9, 40))


def test_tokenizer_with_baked_padding_is_left_untouched(klein_root):
    tokenizer = load_tokenizer(klein_root)
    tokenizer.enable_padding(length=3, pad_id=0)
    tokenizer.enable_truncation(max_length=3)
    text_encoder = Qwen3TextEncoder.from_pretrained(klein_root / "text_encoder")
    prompt_encoder = Flux2PromptEncoder(tokenizer, text_encoder)
    ids, mask = prompt_encoder.tokenize(["a photo of a cat"], 32)
    assert ids.shape == (1, 32) and mask.sum() > 3  # neither the baked length nor truncation applied
    assert tokenizer.padding is not None and tokenizer.truncation is not None


def test_pure_helpers():
    assert pad_or_truncate([5, 6, 7], 5, 0) == ([5, 6, 7, 0, 0], [1, 1, 1, 0, 0])
    assert pad_or_truncate([5, 6, 7], 2, 0) == ([5, 6], [1, 1])
    assert pad_or_truncate([5], 3, 9, "left") == ([9, 9, 5], [0, 0, 1])
    ids = text_position_ids(2, 3)
    assert ids.dtype == torch.long and ids.shape == (2, 3, 4)
    assert ids[1].tolist() == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]]
