"""Small FLUX.2-klein and Z-Image pipelines with random weights: for benchmarks, tests and the toy world.

They use the real classes (Flux2DiT / ZImageDiT, Flux2VAE / AutoencoderKL, Qwen3TextEncoder) with
small configs, and a word-level tokenizer that knows Qwen's chat special tokens, so every code path
of the real pipelines runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tokenizers import AddedToken, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from ..backbones.autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from ..backbones.flux2_dit import Flux2DiT, Flux2DiTConfig
from ..backbones.flux2_vae import Flux2VAE, Flux2VAEConfig
from ..backbones.qwen3 import Qwen3Config, Qwen3TextEncoder
from ..backbones.zimage_dit import ZImageDiT, ZImageDiTConfig
from .flux2_pipeline import Flux2ImagePipeline
from .zimage_pipeline import ZImagePipeline

CHAT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")
DEFAULT_WORDS = (
    "a an the photo of cat dog car red green blue yellow white black small large circle square triangle "
    "at in on top bottom left right center background user assistant"
).split()


def word_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Tokenizer:
    """Whitespace/punctuation split, one id per known word, ``[UNK]`` for the rest, Qwen's specials."""
    vocab = {"[UNK]": 0}
    for word in dict.fromkeys(words):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def tiny_text_config(vocab_size: int, hidden: int = 32) -> Qwen3Config:
    """28 layers (klein reads layers 9, 18, 27), narrow."""
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=28,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=4096,
    )


@dataclass
class RandomPipelineSpec:
    dit: Flux2DiTConfig = field(
        default_factory=lambda: Flux2DiTConfig(
            num_double_blocks=1,
            num_single_blocks=2,
            num_heads=2,
            head_dim=16,
            text_dim=96,
            axes_dims_rope=(4, 4, 4, 4),
        )
    )
    vae: Flux2VAEConfig = field(
        default_factory=lambda: Flux2VAEConfig(
            block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8
        )
    )
    text_hidden: int = 32
    words: tuple[str, ...] = tuple(DEFAULT_WORDS)
    seed: int = 0


def random_flux2_pipeline(
    spec: RandomPipelineSpec | None = None, device: str = "cpu", torch_dtype: torch.dtype = torch.float32
) -> Flux2ImagePipeline:
    """Build a pipeline with seeded random weights (PyTorch's default initialization)."""
    spec = spec or RandomPipelineSpec()
    if spec.dit.text_dim != 3 * spec.text_hidden:
        raise ValueError(f"dit.text_dim {spec.dit.text_dim} must be 3 x text_hidden ({3 * spec.text_hidden})")
    tokenizer = word_tokenizer(spec.words)
    torch.manual_seed(spec.seed)
    dit = Flux2DiT(spec.dit)
    vae = Flux2VAE(spec.vae)
    text_encoder = Qwen3TextEncoder(tiny_text_config(tokenizer.get_vocab_size(), spec.text_hidden))
    for module in (dit, vae, text_encoder):
        module.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    return Flux2ImagePipeline(dit, vae, text_encoder, tokenizer, device=device, torch_dtype=torch_dtype)


@dataclass
class RandomZImageSpec:
    """A tiny Z-Image: 2 main blocks (+1 refiner each) of 2 heads x 32, a VAE downsampling by 2."""

    dit: ZImageDiTConfig = field(
        default_factory=lambda: ZImageDiTConfig(
            dim=64,
            num_layers=2,
            num_refiner_layers=1,
            num_heads=2,
            num_kv_heads=2,
            cap_feat_dim=32,
            axes_dims=(8, 12, 12),
            axes_lens=(256, 64, 64),
        )
    )
    vae: AutoencoderKLConfig = field(
        default_factory=lambda: AutoencoderKLConfig(
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    )
    text_layers: int = 3  # Z-Image reads the second-to-last hidden state
    words: tuple[str, ...] = tuple(DEFAULT_WORDS)
    seed: int = 0
    variant: str = "turbo"


def random_zimage_pipeline(
    spec: RandomZImageSpec | None = None, device: str = "cpu", torch_dtype: torch.dtype = torch.float32
) -> ZImagePipeline:
    """Build a Z-Image pipeline with seeded random weights (PyTorch's default initialization)."""
    spec = spec or RandomZImageSpec()
    tokenizer = word_tokenizer(spec.words)
    torch.manual_seed(spec.seed)
    dit = ZImageDiT(spec.dit)
    with torch.no_grad():  # the pad tokens start at zero in the module; give them values like a checkpoint
        dit.x_pad_token.normal_(0, 0.02)
        dit.cap_pad_token.normal_(0, 0.02)
    vae = AutoencoderKL(spec.vae)
    text_config = tiny_text_config(tokenizer.get_vocab_size(), spec.dit.cap_feat_dim)
    text_config.num_hidden_layers = spec.text_layers
    text_encoder = Qwen3TextEncoder(text_config)
    for module in (dit, vae, text_encoder):
        module.to(device=device, dtype=torch_dtype).eval().requires_grad_(False)
    return ZImagePipeline(
        dit, vae, text_encoder, tokenizer, device=device, torch_dtype=torch_dtype, variant=spec.variant
    )
