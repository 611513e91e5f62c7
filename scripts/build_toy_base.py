"""Assemble the toy world's base model folder in the official FLUX.2-klein layout.

    python scripts/build_toy_base.py --vae WORK/vae --out WORK/base-init          # random DiT, before training
    python scripts/build_toy_base.py --init WORK/base-init --transformer WORK/dit/checkpoint-N/transformer \
        --out models/toy/base --dtype bfloat16                                     # after train.py trained it

Same classes as the real stack, small configs: a Flux2DiT (randomly initialized here; train.py's
`--trainable_models dit` trains it), the toy VAE trained by scripts/train_toy_vae.py, a 28-layer
Qwen3 text encoder kept frozen at a seeded random initialization (its layers 9/18/27 still carry
which words were said, which is all the toy captions need), and a word-level tokenizer over the toy
world's vocabulary with Qwen's chat special tokens.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from diffsynth_templates import Flux2DiT
from diffsynth_templates.backbones.flux2_vae import Flux2VAE
from diffsynth_templates.backbones.qwen3 import Qwen3TextEncoder
from diffsynth_templates.loading import write_json_atomic
from diffsynth_templates.loading.write_safety import write_folder
from diffsynth_templates.pipelines.defaults import DEFAULTS_FILE
from diffsynth_templates.pipelines.flux2_pipeline import Flux2ImagePipeline
from diffsynth_templates.pipelines.random_init import tiny_text_config, word_tokenizer
from diffsynth_templates.toy.configs import GENERATION_DEFAULTS, TEXT_HIDDEN, toy_dit_config, toy_vocabulary

logger = logging.getLogger("build_toy_base")

MODEL_FOLDERS = {"model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"}


def is_model_folder(folder: Path) -> bool:
    """A base-model folder written before the write-safety marker: only the official layout's entries."""
    names = {p.name for p in folder.iterdir()}
    return MODEL_FOLDERS <= names <= MODEL_FOLDERS | {DEFAULTS_FILE}


def save_model(pipe: Flux2ImagePipeline, out: Path, overwrite: bool) -> None:
    """``pipe`` in the official layout plus its generation defaults, written through write-safety."""
    with write_folder(out, overwrite=overwrite, recognise=is_model_folder, kind="toy base model") as tmp:
        pipe.save_pretrained(tmp)
        write_json_atomic(GENERATION_DEFAULTS, tmp / DEFAULTS_FILE)


def check_same_encoder(vae: Flux2VAE, reference: Flux2VAE, name: str) -> None:
    """The DiT was trained on ``reference``'s latents: a replacement VAE may only differ in its decoder."""
    ours, theirs = vae.state_dict(), reference.state_dict()
    keys = [k for k in theirs if not k.startswith(("decoder.", "post_quant_conv.", "bn.num_batches"))]
    changed = [k for k in keys if k not in ours or not torch.equal(ours[k], theirs[k])]
    if changed:
        raise SystemExit(
            f"--vae {name} encodes differently from the VAE the DiT was trained on ({len(changed)} tensors "
            f"differ, e.g. {changed[0]!r}); only a decoder fine-tune (train_toy_vae.py --decoder_only) fits"
        )


def assemble(
    init: Path,
    transformer: Path,
    out: Path,
    dtype: torch.dtype,
    vae: Path | None = None,
    overwrite: bool = False,
) -> None:
    """``init`` with its DiT replaced by the trained ``transformer`` (and optionally its VAE by a decoder
    fine-tune of it); DiT and text encoder stored in ``dtype`` (the VAE stays float32: the inpainting
    constraint is measured on its round trip). Written to a temporary folder and renamed into place."""
    pipe = Flux2ImagePipeline.from_pretrained(
        init, device="cpu", torch_dtype=torch.float32, transformer=transformer
    )
    if vae is not None:
        tuned = Flux2VAE.from_pretrained(vae)
        check_same_encoder(tuned, pipe.vae, str(vae))
        pipe.vae.load_state_dict(tuned.state_dict())
    pipe.dit.to(dtype)
    pipe.text_encoder.to(dtype)
    save_model(pipe, out, overwrite)
    logger.info("wrote %s (DiT from %s, %s)", out, transformer, dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--vae",
        default=None,
        help="trained toy VAE folder (building base-init; with --init: a decoder fine-tune)",
    )
    p.add_argument("--init", default=None, help="base-init folder (assembling the trained base)")
    p.add_argument("--transformer", default=None, help="trained transformer/ folder (with --init)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="DiT / text dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace --out if this project wrote it")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.init:
        if not args.transformer:
            p.error("--init needs --transformer (the trained DiT)")
        vae = Path(args.vae) if args.vae else None
        dtype = getattr(torch, args.dtype)
        assemble(Path(args.init), Path(args.transformer), Path(args.out), dtype, vae, args.overwrite)
        return
    if not args.vae:
        p.error("pass --vae (build base-init) or --init + --transformer (assemble the trained base)")

    vae = Flux2VAE.from_pretrained(args.vae)
    tokenizer = word_tokenizer(toy_vocabulary())
    torch.manual_seed(args.seed)
    dit = Flux2DiT(toy_dit_config(vae.config.latent_channels))
    text_encoder = Qwen3TextEncoder(tiny_text_config(tokenizer.get_vocab_size(), TEXT_HIDDEN))
    pipe = Flux2ImagePipeline(dit, vae, text_encoder, tokenizer, device="cpu", torch_dtype=torch.float32)
    save_model(pipe, Path(args.out), args.overwrite)
    counts = {
        n: sum(t.numel() for t in m.parameters())
        for n, m in (("dit", dit), ("vae", vae), ("text", text_encoder))
    }
    logger.info("wrote %s: parameters %s, vocabulary %d", args.out, counts, tokenizer.get_vocab_size())


if __name__ == "__main__":
    main()
