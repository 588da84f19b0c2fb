#!/usr/bin/env bash
# Shared body of the pebr_*.sbatch scripts: one torchrun per node under srun, rendezvous on the first node.
# Expects SUBCOMMAND and CONFIG; extra key=value overrides come from the sbatch command line ("$@").
set -euo pipefail
: "${SUBCOMMAND:?}" "${CONFIG:?}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${SLURM_JOB_NUM_NODES:-1}
HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || hostname)
PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# One srun task per node runs torchrun, which starts GPUS_PER_NODE ranks: the task needs the node's CPUs.
# Without -c, srun gives the step's task one CPU (the default of one per task: the pebr_*.sbatch files ask for
# no --cpus-per-task, and Slurm 22.05-23.02's srun would not inherit it), and every rank, data loader and
# SGLang scheduler of the node shares that core.
CPUS_PER_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
cmd=(torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --rdzv-backend c10d
     --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "${SLURM_JOB_ID:-local}"
     -m pebr_mega "$SUBCOMMAND" --config "$CONFIG" "$@")
if [[ "${DRY_RUN:-0}" != 0 ]]; then
  echo "srun --ntasks-per-node 1 --cpus-per-task $CPUS_PER_NODE ${cmd[*]}"
  exec python3 -m pebr_mega config --config "$CONFIG" "$@"
fi
exec srun --ntasks-per-node 1 --cpus-per-task "$CPUS_PER_NODE" --kill-on-bad-exit=1 "${cmd[@]}"
