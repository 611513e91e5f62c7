"""Train Diffusion Templates (and DiTs) in two stages, on a FLUX.2-klein or a Z-Image base model.

The backbone is read from the model folder (``--model``, e.g. ``black-forest-labs/FLUX.2-klein-base-4B``
or ``Tongyi-MAI/Z-Image-Turbo``): the same commands train on either.

    # stage I: features (text embeddings, latents, template features) to disk, no gradients
    accelerate launch train.py --task data_process --model MODEL --template TEMPLATE \\
        --dataset_metadata_path data/metadata.jsonl --cache_path cache/brightness
    # stage II: optimize the template from the cache (loads only the DiT + template)
    accelerate launch train.py --task train --model MODEL --template TEMPLATE \\
        --cache_path cache/brightness --output_path runs/brightness --learning_rate 1e-4 --num_epochs 2
    # or both in one run, features in memory
    accelerate launch train.py --task full ... (the union of the flags above, minus --cache_path)

``python train.py --help`` lists every flag; ``--config run.yaml`` supplies defaults for any of them.
See docs/training.md.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from diffsynth_templates.errors import DiffSynthTemplatesError

    rank = int(os.environ.get("RANK", "0"))
    # only the main process talks; the others report errors
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.ERROR,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
        if rank
        else "%(asctime)s %(levelname)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        from diffsynth_templates.training.config import parse_args

        config = parse_args(argv)
        from diffsynth_templates.training.trainer import run  # after parsing: --help stays quick

        run(config)
    except (DiffSynthTemplatesError, FileNotFoundError) as e:
        # a problem with the inputs (arguments, files, caches, checkpoints): the message says what to do,
        # a traceback would only hide it; anything else escaping is a bug and keeps its traceback
        print(f"error: {'' if rank == 0 else f'[rank {rank}] '}{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
