"""Tiny DiT builders shared by the per-backbone DiT tests and the twin tests parametrized over families.

Each family gets a ``DiTCase``: its diffusers reference (saved sharded in the official layout), its
input builder, and the block names its KV-cache tests use, so one test body checks one law on both."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffsynth_templates import Flux2DiT
from diffsynth_templates.backbones.zimage_dit import ZImageDiT

FLUX2_TINY = dict(
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    timestep_guidance_channels=32,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

ZIMAGE_TINY = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=24,
    rope_theta=256.0,
    axes_dims=[8, 12, 12],
    axes_lens=[256, 64, 64],
)


def flux2_reference(folder: Path) -> tuple[nn.Module, Path]:
    """A tiny diffusers Flux2Transformer2DModel saved sharded in the official layout."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(**FLUX2_TINY).eval()
    with torch.no_grad():  # diffusers zero-inits nothing here, but make every weight non-trivial anyway
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(folder, max_shard_size="20KB")
    return ref, folder


def zimage_reference(folder: Path) -> tuple[nn.Module, Path]:
    """A tiny diffusers ZImageTransformer2DModel, every weight randomized, saved sharded in the official layout."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(**ZIMAGE_TINY).eval()
    with torch.no_grad():  # pad tokens and norms start at 0 / 1: move them so a wrong use shows
        for name, p in ref.named_parameters():
            if "norm" in name or name == "cap_embedder.0.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    ref.save_pretrained(folder, max_shard_size="30KB")
    return ref, folder


def flux2_inputs(batch=2, n_img=12, n_txt=5, seed=0, cfg=FLUX2_TINY):
    g = torch.Generator().manual_seed(seed)
    # image tokens on a grid (t, h, w, l) = (0, row, col, 0), as the pipeline lays them out
    img_ids = torch.zeros(n_img, 4)
    img_ids[:, 1] = torch.arange(n_img) // 4
    img_ids[:, 2] = torch.arange(n_img) % 4
    txt_ids = torch.zeros(n_txt, 4)
    txt_ids[:, 3] = torch.arange(n_txt)
    return dict(
        hidden_states=torch.randn(batch, n_img, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, n_txt, cfg["joint_attention_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=img_ids,
        txt_ids=txt_ids,
    )


def zimage_inputs(caption_lengths=(7, 7), sizes=((8, 8), (8, 8)), seed=0, dtype=torch.float32):
    """Latents ``[16, 1, H, W]`` and caption features per sample; 8x8 latents are 16 tokens, so both
    segments get learned pad tokens (to 32); caption lengths 7 and 40 pad to 32 and 64 (a ragged batch)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=[torch.randn(16, 1, h, w, generator=g).to(dtype) for h, w in sizes],
        t=torch.rand(len(sizes), generator=g),
        cap_feats=[
            torch.randn(n, ZIMAGE_TINY["cap_feat_dim"], generator=g).to(dtype) for n in caption_lengths
        ],
    )


def as_list(out: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """FLUX.2 returns one batched tensor, Z-Image a list (one tensor per sample)."""
    return [out] if isinstance(out, torch.Tensor) else list(out)


def max_diff(a, b) -> float:
    """The largest absolute difference between two outputs of the same shapes (tensor or list)."""
    a, b = as_list(a), as_list(b)
    assert [x.shape for x in a] == [y.shape for y in b]
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def random_kv(model: nn.Module, length: int, batch: int = 1, seed: int = 1, names=None):
    g = torch.Generator().manual_seed(seed)
    specs = model.kv_block_specs
    return {
        n: tuple(torch.randn(batch, length, specs[n].heads, specs[n].head_dim, generator=g) for _ in range(2))
        for n in names or list(specs)
    }


@dataclass(frozen=True)
class DiTCase:
    """One family's tiny DiT, as the twin tests need it."""

    family: str
    dit_class: type
    reference: Callable[[Path], tuple[nn.Module, Path]]
    # (batch, ragged) -> the DiT's keyword inputs; ragged: captions of different lengths where the
    # family has them (Z-Image), the same inputs otherwise
    inputs: Callable[[int, bool], dict]
    first_block: str  # a KV block name, and one more of the same family
    other_block: str
    unknown_block: str  # a DiT block that takes no template tokens (or does not exist)


def _zimage_batch(batch: int, ragged: bool) -> dict:
    lengths = (7, 40, 12)[:batch] if ragged else (7,) * batch
    return zimage_inputs(lengths, ((8, 8),) * batch)


DIT_CASES = {
    "flux2": DiTCase(
        "flux2",
        Flux2DiT,
        flux2_reference,
        lambda batch, ragged: flux2_inputs(batch=batch),
        first_block="single_0",
        other_block="single_1",
        unknown_block="double_9",
    ),
    "zimage": DiTCase(
        "zimage",
        ZImageDiT,
        zimage_reference,
        _zimage_batch,
        first_block="block_0",
        other_block="block_1",
        unknown_block="noise_refiner_0",  # refiners take no template tokens
    ),
}
