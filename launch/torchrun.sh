#!/usr/bin/env bash
# One node: run a pebr subcommand on every local GPU with torchrun.
#
#   launch/torchrun.sh train --config launch/configs/qwen2_5_vl_7b.yaml grpo.stage=stage1 [key=value ...]
#   GPUS=4 launch/torchrun.sh sft --config launch/configs/qwen2_5_vl_3b.yaml
#   DRY_RUN=1 launch/torchrun.sh train --config ...   # print the command and the resolved config, run nothing
set -euo pipefail
GPUS=${GPUS:-$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")}
PORT=${MASTER_PORT:-29500}
cmd=(torchrun --standalone --nnodes 1 --nproc-per-node "$GPUS" --master-port "$PORT" -m pebr_mega "$@")
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  echo "${cmd[*]}"
  exec python3 -m pebr_mega config "${@:2}"
fi
exec "${cmd[@]}"
