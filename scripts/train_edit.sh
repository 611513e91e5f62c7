#!/usr/bin/env bash
# Editing: image_kv reads the source image and the instruction (the row's prompt). Put the source in
# template_inputs.image for template-only editing (as DiffSynth-Studio's Edit template), or in edit_image
# to also give it to the DiT as a native klein reference image.
# Trains a image_kv template for FLUX.2-klein-base-4B on one node: stage I (features to $CACHE, once),
# then stage II (the template from the cache). Both stages resume when rerun after a crash.
#
#   DATASET=data/edit NUM_GPUS=8 bash scripts/train_edit.sh [extra stage-II flags]
#
# Continue from a published template instead of a fresh one: TEMPLATE=path/or/modelscope-id.
# Smoke test on the bundled toy model: MODEL=models/toy/base TEXT_ENCODER= VAE= TOKENIZER= NUM_GPUS=1 ...
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-black-forest-labs/FLUX.2-klein-base-4B}
TEXT_ENCODER=${TEXT_ENCODER-black-forest-labs/FLUX.2-klein-4B}  # klein-base reuses klein's encoder, VAE, tokenizer
VAE=${VAE-black-forest-labs/FLUX.2-klein-4B}
TOKENIZER=${TOKENIZER-black-forest-labs/FLUX.2-klein-4B}
DATASET=${DATASET:-data/edit}
METADATA=${METADATA:-$DATASET/metadata.jsonl}
CACHE=${CACHE:-cache/edit}
OUTPUT=${OUTPUT:-models/train/edit}
NUM_GPUS=${NUM_GPUS:-8}
TEMPLATE=${TEMPLATE:-}
ARCH_CONFIG=${ARCH_CONFIG:-'{"use_prompt": true, "num_double_blocks": 1}'}  # the klein-4B size; smaller for toy models
MAX_PIXELS=${MAX_PIXELS:-1048576}

LAUNCH=(accelerate launch --config_file scripts/accelerate_ddp.yaml --num_processes "$NUM_GPUS")
BASE=(--model "$MODEL")
[ -n "$TEXT_ENCODER" ] && BASE+=(--text_encoder "$TEXT_ENCODER")
[ -n "$VAE" ] && BASE+=(--vae "$VAE")
[ -n "$TOKENIZER" ] && BASE+=(--tokenizer "$TOKENIZER")
if [ -n "$TEMPLATE" ]; then
  MODELS=("${BASE[@]}" --template "$TEMPLATE" --data_processor edit)
else
  MODELS=("${BASE[@]}" --architecture image_kv --architecture_config "$ARCH_CONFIG" --data_processor edit --template_name edit)
fi
COMMON=("${MODELS[@]}" --max_pixels "$MAX_PIXELS" --max_sequence_length 512 --mixed_precision bf16 --seed 0)

"${LAUNCH[@]}" train.py --task data_process "${COMMON[@]}" \
  --dataset_base_path "$DATASET" --dataset_metadata_path "$METADATA" \
  --cache_path "$CACHE" --dataset_num_workers 4

"${LAUNCH[@]}" train.py --task train "${COMMON[@]}" \
  --dataset_metadata_path "$METADATA" --cache_path "$CACHE" --output_path "$OUTPUT" \
  --learning_rate 1e-4 --num_epochs 100 --batch_size 1 --gradient_accumulation_steps 1 \
  --warmup_steps 100 --lr_scheduler constant --max_grad_norm 1.0 \
  --use_gradient_checkpointing --dataset_num_workers 4 \
  --save_steps 1000 --save_total_limit 3 --resume auto "$@"
