#!/usr/bin/env bash
# Reproduce the toy world from scratch, with this repository's own tools:
#   dataset (diffsynth_templates/toy/world.py) -> VAE (scripts/train_toy_vae.py) -> base model whose DiT is trained
#   by train.py (--trainable_models dit, two-stage) -> six templates trained by train.py (two-stage; structure
#   then fine-tuned from its published folder with condition dropout, scripts/toy_tasks.py says how)
#   -> packaged in models/toy/ (declarative folders with model cards) -> scripts/eval_controls.py.
#
#   bash scripts/train_toy.sh                 # the shipped models: a few hours on 2 CPU cores
#   TOY_SMOKE=1 bash scripts/train_toy.sh     # every stage with tiny step counts, into outputs/toy_smoke (CI)
#
# Each stage is skipped when its output exists and train.py runs resume (--resume auto), so an
# interrupted run continues where it stopped. Environment: PYTHON, TOY_DATA (the dataset), TOY_WORK
# (intermediate files), TOY_OUT (final models), TOY_TASKS (a space-separated subset of the tasks).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
# every stage runs this checkout's library (diffsynth_templates, its toy world included), also where another
# copy is installed: scripts/*.py are run by path, so Python would otherwise look only at the installed one
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per process: robust on a shared 2-core machine

if [ "${TOY_SMOKE:-0}" = "1" ]; then
    ROOT=outputs/toy_smoke
    DATA=${TOY_DATA:-$ROOT/data}; WORK=${TOY_WORK:-$ROOT/work}; OUT=${TOY_OUT:-$ROOT/models}
    SAMPLES=24; VAE_STEPS=2; DECODER_STEPS=2; DIT_STEPS=2; TEMPLATE_STEPS=2; EVAL="--quick --steps 4"
else
    DATA=${TOY_DATA:-datasets/toy}; WORK=${TOY_WORK:-outputs/toy_work}; OUT=${TOY_OUT:-models/toy}
    SAMPLES=4000; VAE_STEPS=2000; DECODER_STEPS=5000; DIT_STEPS=6000; TEMPLATE_STEPS=""; EVAL=""
fi
TASKS=${TOY_TASKS:-$($PY scripts/toy_tasks.py list)}
COMMON=(--max_sequence_length 40 --max_pixels 4096 --shared_feature_cache "$WORK/feature_store")  # 64 x 64

latest() {  # the newest checkpoint folder of a train.py output path
    $PY -c "import json,sys; print(sys.argv[1] + '/' + json.load(open(sys.argv[1] + '/latest.json'))['checkpoint'])" "$1"
}

echo "== 1. dataset: $DATA"
[ -f "$DATA/metadata.jsonl" ] || $PY -m diffsynth_templates.toy.world --out "$DATA" --num_samples "$SAMPLES" --seed 0 --size 64

echo "== 2. VAE"
[ -f "$WORK/vae/config.json" ] || $PY scripts/train_toy_vae.py --data "$DATA" --out "$WORK/vae" --steps "$VAE_STEPS" \
    $( [ "${TOY_SMOKE:-0}" = "1" ] && echo "--full_steps 1 --batch_size 4" )

echo "== 2b. VAE decoder fine-tune (encoder frozen: runs beside the DiT, whose latents it does not change)"
DECODER_PID=""
if [ ! -f "$WORK/vae_decoder/config.json" ]; then
    $PY scripts/train_toy_vae.py --data "$DATA" --init "$WORK/vae" --decoder_only --out "$WORK/vae_decoder" \
        --steps "$DECODER_STEPS" --learning_rate 1e-3 $( [ "${TOY_SMOKE:-0}" = "1" ] && echo "--batch_size 4" ) &
    DECODER_PID=$!
fi

echo "== 3. base model: DiT trained by train.py"
[ -d "$WORK/base-init" ] || $PY scripts/build_toy_base.py --vae "$WORK/vae" --out "$WORK/base-init"
DIT_ARGS=(--model "$WORK/base-init" --trainable_models dit --dataset_base_path "$DATA" --dataset_metadata_path "$DATA/metadata.jsonl"
          --cache_path "$WORK/dit/cache" --output_path "$WORK/dit" "${COMMON[@]}")
$PY train.py --task data_process "${DIT_ARGS[@]}"
$PY train.py --task train "${DIT_ARGS[@]}" --resume auto --max_steps "$DIT_STEPS" --batch_size 16 --learning_rate 1e-3 \
    --lr_scheduler cosine --warmup_steps 200 --save_steps 250 --save_total_limit 2 --log_steps 25
[ -z "$DECODER_PID" ] || wait "$DECODER_PID"
[ -d "$OUT/base" ] || $PY scripts/build_toy_base.py --init "$WORK/base-init" --vae "$WORK/vae_decoder" \
    --transformer "$(latest "$WORK/dit")/transformer" --out "$OUT/base" --dtype bfloat16

echo "== 4. templates: $TASKS"
for task in $TASKS; do
    [ -f "$OUT/templates/$task/template.json" ] && continue
    # the task's dataset: $DATA, or its copy with a wider tint range (same scenes; made here once)
    TDATA=$($PY scripts/toy_tasks.py dataset --task "$task" --data "$DATA" --num_samples "$SAMPLES" --seed 0 --size 64)
    read -r -a FLAGS <<< "$($PY scripts/toy_tasks.py prepare --task "$task" --data "$TDATA" --base "$OUT/base" --work "$WORK/templates")"
    [ -n "$TEMPLATE_STEPS" ] && FLAGS+=(--max_steps "$TEMPLATE_STEPS")
    T_ARGS=(--model "$OUT/base" --dataset_base_path "$TDATA" --cache_path "$WORK/templates/$task/cache"
            --output_path "$WORK/templates/$task/run" "${COMMON[@]}" "${FLAGS[@]}")
    $PY train.py --task data_process "${T_ARGS[@]}"
    $PY train.py --task train "${T_ARGS[@]}" --resume auto --batch_size 8 --lr_scheduler cosine --warmup_steps 20 \
        --save_steps 200 --save_total_limit 1 --log_steps 25
    RESULT=$(latest "$WORK/templates/$task/run")
    if $PY scripts/toy_tasks.py has_finetune --task "$task"; then
        # phase 2 (structure): the phase-1 template, published in bf16 like every shipped one, trained further
        # with condition dropout so that its map wins over a prompt that places the shapes elsewhere
        ALIGNED="$WORK/templates/$task/aligned"
        [ -f "$ALIGNED/template.json" ] || $PY -m diffsynth_templates publish "$RESULT" --repo "diffsynth-templates/toy-$task" \
            --dry-run --out "$ALIGNED" --dtype bfloat16 --base_model "$OUT/base" --verify_base "$OUT/base" \
            --description "$($PY scripts/toy_tasks.py describe --task "$task")"
        read -r -a FT <<< "$($PY scripts/toy_tasks.py prepare --task "$task" --phase finetune --data "$TDATA" --base "$OUT/base" --work "$WORK/templates")"
        [ -n "$TEMPLATE_STEPS" ] && FT+=(--max_steps "$TEMPLATE_STEPS")
        F_ARGS=(--model "$OUT/base" --template "$ALIGNED" --dataset_base_path "$TDATA" --cache_path "$WORK/templates/$task/finetune-cache"
                --output_path "$WORK/templates/$task/finetune" "${COMMON[@]}" "${FT[@]}")
        $PY train.py --task data_process "${F_ARGS[@]}"
        $PY train.py --task train "${F_ARGS[@]}" --resume auto --batch_size 8 --lr_scheduler cosine --warmup_steps 20 \
            --save_steps 200 --save_total_limit 1 --log_steps 25
        RESULT=$(latest "$WORK/templates/$task/finetune")
    fi
    $PY -m diffsynth_templates publish "$RESULT" --repo "diffsynth-templates/toy-$task" \
        --dry-run --out "$OUT/templates/$task" --dtype bfloat16 --base_model "$OUT/base" \
        --verify_base "$OUT/base" --description "$($PY scripts/toy_tasks.py describe --task "$task")"
done

echo "== 5. evaluation"
$PY scripts/eval_controls.py --model "$OUT/base" --templates "$OUT/templates" --out "$OUT/eval_controls.md" $EVAL \
    --strengths 0 0.25 0.5 1 1.5
