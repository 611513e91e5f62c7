"""Train the toy world's FLUX.2 VAE (the real Flux2VAE class, small config) and set its BatchNorm statistics.

    python scripts/train_toy_vae.py --data datasets/toy --out models/toy/vae --steps 2000

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
from diffsynth_templates.loading.safetensors_io import (
    load_safetensors,
    read_safetensors_metadata,
    save_safetensors_atomic,
)
from diffsynth_templates.toy.configs import TOY_VAE_CONFIG
from diffsynth_templates.training.checkpoint import flatten_optimizer_state, unflatten_optimizer_state

logger = logging.getLogger("train_toy_vae")


def load_images(data: Path, limit: int | None) -> torch.Tensor:
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    arrays = [
        np.asarray(Image.open(data / r["image"]).convert("RGB"), dtype=np.float32) / 127.5 - 1 for r in rows
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random ``size`` crop per image, aligned to the VAE's 8-pixel latent grid."""
    if not size or size >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - size) // 8 + 1
    ys, xs = (torch.randint(0, cells, (len(x),), generator=g) * 8 for _ in range(2))
    return torch.stack([img[:, y : y + size, x0 : x0 + size] for img, y, x0 in zip(x, ys, xs)])


def save_state(path: Path, vae: Flux2VAE, opt: torch.optim.Optimizer, g: torch.Generator, step: int) -> None:
    """Resume point as one safetensors file (no pickle): weights, optimizer tensors and the sampler's
    state as tensors; the step and the optimizer's scalars as JSON in its metadata. Written atomically."""
    opt_tensors, opt_meta = flatten_optimizer_state(opt.state_dict())
    tensors = {
        **{f"vae/{k}": v.detach().contiguous() for k, v in vae.state_dict().items()},
        **{f"opt/{k}": v.contiguous() for k, v in opt_tensors.items()},
        "rng": g.get_state(),
    }
    save_safetensors_atomic(tensors, path, metadata={"step": str(step), "optimizer": json.dumps(opt_meta)})


def load_state(path: Path, vae: Flux2VAE, opt: torch.optim.Optimizer, g: torch.Generator) -> int:
    """Restore what ``save_state`` wrote; return its step."""
    tensors = load_safetensors(path)
    meta = read_safetensors_metadata(path)
    vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae/")})
    opt_tensors = {k[4:]: v for k, v in tensors.items() if k.startswith("opt/")}
    opt.load_state_dict(unflatten_optimizer_state(opt_tensors, json.loads(meta["optimizer"])))
    g.set_state(tensors["rng"])
    return int(meta["step"])


def train(
    vae: Flux2VAE,
    images: torch.Tensor,
    steps: int,
    batch: int,
    lr: float,
    kl_weight: float,
    seed: int,
    crop: int,
    full_steps: int,
    state_path: Path | None = None,
    save_every: int = 250,
    held_out: torch.Tensor | None = None,
    decoder_only: bool = False,
) -> None:
    """Reconstruction training on ``crop`` crops (4x cheaper at 64 px), then ``full_steps`` on whole
    images so the mid-block attention also sees the full 16x16 latent grid. With ``state_path`` the
    run saves a resume point every ``save_every`` steps and continues from one that exists. With
    ``decoder_only`` the encoder stays frozen: the latents (all the DiT and the templates ever see)
    do not change, so the decoder can keep improving while models are trained on those latents."""
    g = torch.Generator().manual_seed(seed)
    trainable = [
        p
        for n, p in vae.named_parameters()
        if not decoder_only or n.startswith(("decoder.", "post_quant_conv."))
    ]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    start = 0
    if state_path is not None and state_path.is_file():
        start = load_state(state_path, vae, opt, g)
        logger.info("resuming from %s at step %d", state_path, start)
    vae.train().requires_grad_(False)
    for param in trainable:
        param.requires_grad_(True)
    if decoder_only:
        vae.encoder.eval()
    bar = tqdm(range(start, steps), desc="toy VAE", initial=start, total=steps)
    for step in bar:
        if state_path is not None and step > start and step % save_every == 0:
            save_state(state_path, vae, opt, g, step)
        lr_now = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr_now
        full = step >= steps - full_steps
        idx = torch.randint(0, len(images), (batch // 2 if full else batch,), generator=g)
        x = images[idx] if full else random_crops(images[idx], crop, g)
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.set_grad_enabled(not decoder_only):
            mean = vae.encoder_moments(x).chunk(2, dim=1)[0]
        # the decoder reads the posterior mean (what encode() returns to the DiT): at this size, sampling
        # the posterior during training cost ~10 dB of reconstruction (22 dB after 3000 steps); the tiny
        # KL term only keeps the means bounded, and the BatchNorm statistics standardize them for the DiT
        recon = vae.decode(mean)
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * mean.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_now:.2e}")
        if held_out is not None and step % 500 == 0:
            with torch.no_grad():
                recon = vae.decode(vae.encoder_moments(held_out).chunk(2, dim=1)[0]).clamp(-1, 1)
            mse = ((recon - held_out) / 2).square().mean().item()
            logger.info("step %d: held-out PSNR %.2f dB", step, 10 * math.log10(1 / mse))
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
    p.add_argument(
        "--data", default="datasets/toy", help="toy dataset folder (python -m diffsynth_templates.toy.world)"
    )
    p.add_argument("--out", default="models/toy/vae", help="output vae/ folder (official layout)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--kl_weight", type=float, default=1e-6, help="weight of the latent means' L2 penalty")
    p.add_argument("--crop", type=int, default=0, help="training crop size in pixels (0: whole images)")
    p.add_argument(
        "--channels", default=None, help="block_out_channels, e.g. 32,64,64,128 (default: the toy config's)"
    )
    p.add_argument("--layers_per_block", type=int, default=None)
    p.add_argument("--init", default=None, help="start from this trained VAE folder (fine-tuning)")
    p.add_argument(
        "--decoder_only",
        action="store_true",
        help="with --init: train only the decoder (the latents, and models trained on them, stay valid)",
    )
    p.add_argument("--full_steps", type=int, default=0, help="final steps on whole images (with --crop)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.decoder_only and not args.init:
        p.error("--decoder_only fine-tunes a trained VAE: pass --init FOLDER")
    if args.threads:
        torch.set_num_threads(args.threads)

    images = load_images(Path(args.data), args.limit)
    n_held = min(64, max(1, len(images) // 10))  # the last images are only measured, never trained on
    held_out, images = images[-n_held:], images[:-n_held]
    torch.manual_seed(args.seed)
    config = dict(TOY_VAE_CONFIG)
    if args.channels:
        config["block_out_channels"] = tuple(int(c) for c in args.channels.split(","))
    if args.layers_per_block:
        config["layers_per_block"] = args.layers_per_block
    vae = Flux2VAE.from_pretrained(args.init) if args.init else Flux2VAE(Flux2VAEConfig(**config))
    logger.info(
        "toy VAE: %.2fM parameters, %d images", sum(t.numel() for t in vae.parameters()) / 1e6, len(images)
    )
    start = time.time()
    train(
        vae,
        images,
        args.steps,
        args.batch_size,
        args.learning_rate,
        args.kl_weight,
        args.seed,
        args.crop,
        args.full_steps,
        Path(args.out + ".resume.safetensors"),
        held_out=held_out[:16],
        decoder_only=args.decoder_only,
    )
    if not args.decoder_only:  # a frozen encoder keeps its statistics (and the latents stay bit-identical)
        set_batchnorm_statistics(vae, images)
    logger.info(
        "trained in %.0f s; held-out reconstruction PSNR %.2f dB",
        time.time() - start,
        reconstruction_psnr(vae, held_out),
    )
    vae.save_pretrained(args.out)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
