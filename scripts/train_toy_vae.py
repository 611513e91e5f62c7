"""Train the toy world's FLUX.2 VAE (the real Flux2VAE class, small config) and set its BatchNorm statistics.

    python scripts/train_toy_vae.py --data datasets/toy --out models/toy/vae --steps 1500

The DiT never sees pixels, only the VAE's patchified latents normalized by the BatchNorm running
statistics, so after reconstruction training the statistics are measured on the training set (as
the official checkpoint stores them). Deterministic for a seed on a given machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from diffsynth_templates.backbones.flux2_vae import Flux2VAE, Flux2VAEConfig

logger = logging.getLogger("train_toy_vae")

TOY_VAE_CONFIG = dict(
    block_out_channels=(16, 32, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=8
)


def load_images(data: Path, limit: int | None) -> torch.Tensor:
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    arrays = [
        np.asarray(Image.open(data / r["image"]).convert("RGB"), dtype=np.float32) / 127.5 - 1 for r in rows
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def kl_to_standard_normal(moments: torch.Tensor) -> torch.Tensor:
    mean, logvar = moments.chunk(2, dim=1)
    logvar = logvar.clamp(-30, 20)
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()


def train(
    vae: Flux2VAE, images: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train().requires_grad_(True)
    bar = tqdm(range(steps), desc="toy VAE")
    for step in bar:
        lr_now = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = images[idx]
        flip = torch.rand(batch, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        moments = vae.encoder_moments(x)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean + torch.randn(mean.shape, generator=g) * (0.5 * logvar.clamp(-30, 20)).exp()
        recon = vae.decode(z)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * kl_to_standard_normal(moments)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_now:.2e}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def set_batchnorm_statistics(vae: Flux2VAE, images: torch.Tensor, batch: int = 64) -> None:
    """Per-channel mean / variance of the patchified latents over the training images."""
    latents = torch.cat(
        [vae.patchify(vae.encode(images[i : i + batch])) for i in range(0, len(images), batch)]
    )
    vae.bn.running_mean.copy_(latents.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_(latents.var(dim=(0, 2, 3)))


@torch.no_grad()
def reconstruction_psnr(vae: Flux2VAE, images: torch.Tensor) -> float:
    recon = vae.decode_from_dit(vae.encode_to_dit(images)).clamp(-1, 1)
    mse = ((recon - images) / 2).square().mean().item()
    return 10 * math.log10(1 / mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="datasets/toy", help="toy dataset folder (python -m datasets.toy_world)")
    p.add_argument("--out", default="models/toy/vae", help="output vae/ folder (official layout)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--kl_weight", type=float, default=1e-4)
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    images = load_images(Path(args.data), args.limit)
    held_out = images[-64:]
    torch.manual_seed(args.seed)
    vae = Flux2VAE(Flux2VAEConfig(**TOY_VAE_CONFIG))
    logger.info(
        "toy VAE: %.2fM parameters, %d images", sum(t.numel() for t in vae.parameters()) / 1e6, len(images)
    )
    start = time.time()
    train(vae, images[:-64], args.steps, args.batch_size, args.learning_rate, args.kl_weight, args.seed)
    set_batchnorm_statistics(vae, images[:-64])
    logger.info(
        "trained in %.0f s; held-out reconstruction PSNR %.2f dB",
        time.time() - start,
        reconstruction_psnr(vae, held_out),
    )
    vae.save_pretrained(args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
