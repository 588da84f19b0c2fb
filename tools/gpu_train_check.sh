#!/usr/bin/env bash
# A 2-step GRPO run of the tiny model through launch/torchrun.sh on one GPU (tools/gpu_checks.sh, step
# `torchrun_train`): torchrun's environment, NCCL start-up, the HF rollout engine's release / resume / sync on
# real CUDA memory through EngineLifecycle, a checkpoint and the export.
#
#     bash tools/gpu_train_check.sh WORK_DIR
#     TRAIN_ARGS="model.params_dtype=float32" bash tools/gpu_train_check.sh WORK_DIR   # on a CPU (gloo)
set -euo pipefail
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of overrides
WORK=${1:?usage: bash tools/gpu_train_check.sh WORK_DIR}
cd "$(dirname "$0")/.."
mkdir -p "$WORK"
python3 -m pebr_mega tiny-model --out "$WORK/model" > "$WORK/tiny_model.log"
python3 -m pebr_mega synth --out "$WORK/data" --num 8 --num-eval 4 --seed 0 > "$WORK/synth.log"
GPUS=1 MASTER_PORT=${MASTER_PORT:-29533} bash launch/torchrun.sh train \
    grpo.stage=stage2 "grpo.init_model=$WORK/model" "grpo.train_file=$WORK/data/grpo.json" \
    "run.output_dir=$WORK/run" "data.eval_file=" grpo.max_steps=2 grpo.save_every=1 \
    grpo.rollout_batch_size=4 grpo.mini_batch_size=2 rollout.engine=hf rollout.n=2 rollout.max_new_tokens=16 \
    images.min_pixels=3136 images.max_pixels=50176 logging.progress_bar=false ${TRAIN_ARGS:-}
# The run must leave its last checkpoint and the exported model.
ls -d "$WORK"/run/checkpoints/step_2 "$WORK"/run/hf/model.safetensors
echo "gpu_train_check: ok"
