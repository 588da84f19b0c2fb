#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one pass, for one short lease of an H100/H200.
#
#     bash tools/gpu_checks.sh OUT_DIR
#
# Runs, each under its own time limit so that one hang does not lose the rest:
#   1. tests: every gpu-marked test: the compiled Triton kernels against float64 references
#      (test_kernels_cuda.py), the GPU-built model against transformers (test_model_cuda.py), the packed
#      attention paths -- torch's varlen_attn, flash-attn when installed, the padded SDPA -- against the
#      per-segment reference in bf16 with one kernel per call and no host sync (test_model_attention.py),
#      and the actor (test_actor_cuda.py: one fp32 GRPO step against the float64 reference with every
#      micro-batch padded to 16, save and resume; bf16 log-probs through the flash attention from both
#      log-prob paths; one attention kernel per layer per micro-batch, profiled);
#   2. kernels: tools/bench_kernels.py --write-docs (log-probs, fused linear log-probs, GRPO loss);
#   3. grpo_step: tools/bench_grpo_step.py --model 7b-shaped --layers 4 --record ... (the actor phases of a
#      64 x 8 RL batch, ours against transformers' padded actor; BENCH_GRPO_ARGS adds arguments, e.g.
#      "--prompts 32" to halve it);
#   4. train_step: tools/bench_train_step.py --record ... (7B-shaped Megatron layers, forward + backward).
# These four limits add up to ~14 minutes (the DALI and plan-memory blocks at the end add theirs); where one
# call may run 10 minutes, split it: ONLY="tests kernels" bash tools/gpu_checks.sh OUT, then
# ONLY="grpo_step train_step" bash tools/gpu_checks.sh OUT (and ONLY="plan_memory", ONLY="dali_mixed").
# The benchmarks append their rows to docs/PERFORMANCE.md; the file and every log are copied to OUT_DIR
# after each step. Packages missing on the machine are expected as wheels in .whl/ (see docs/PERFORMANCE.md,
# "Running the GPU checks"); they are installed into /tmp/site. ONLY="tests grpo_step" runs just those steps.
set -u
OUT_DIR=${1:?usage: bash tools/gpu_checks.sh OUT_DIR}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_checks: installing .whl/ failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# This checkout on the path (an editable install would need setuptools from an index, which such a machine
# cannot reach); pebr_mega/kernels is the committed link to kernels/.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import pebr_mega.kernels.ops" || { echo "gpu_checks: cannot import pebr_mega.kernels.ops"; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF'
import importlib.metadata as md
import torch
names = ["torch", "triton", "transformers", "megatron-core", "liger-kernel", "flash-attn", "transformer-engine"]
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "absent"
print(torch.cuda.get_device_name(), "|", ", ".join(f"{n} {version(n)}" for n in names))
try:  # what the packed attention's `varlen` backend adapts to (pebr_mega/models/attention.py)
    import inspect
    from torch.nn.attention.varlen import varlen_attn
    print("torch varlen_attn parameters:", list(inspect.signature(varlen_attn).parameters))
except Exception as e:
    print("torch varlen_attn: absent", type(e).__name__)
EOF

step() {  # step NAME SECONDS COMMAND...: run under a time limit, log to OUT_DIR/NAME.log, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    start=$(date +%s)
    echo "=== $name: $*"
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    echo "=== $name: rc $rc in $(( $(date +%s) - start )) s"
    tail -n "${TAIL:-30}" "$OUT_DIR/$name.log"
    cp docs/PERFORMANCE.md "$OUT_DIR/PERFORMANCE.md"
}

TAIL=40 step tests 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/
TAIL=45 step kernels 170 python3 tools/bench_kernels.py --write-docs
# shellcheck disable=SC2086  # BENCH_GRPO_ARGS is a list of arguments
TAIL=25 step grpo_step 330 python3 tools/bench_grpo_step.py --model 7b-shaped --layers 4 --device cuda \
    --record docs/PERFORMANCE.md --json "$OUT_DIR/grpo_step.json" ${BENCH_GRPO_ARGS:-}
step train_step 100 python3 tools/bench_train_step.py --record docs/PERFORMANCE.md

# ---- BEGIN DALI "mixed" decode (issue 11; added on the sglang branch) ---------------------------------------
# DALI's GPU decode (nvJPEG, device "mixed") against its CPU pipeline: the gpu-marked DALI test of
# tests/test_images.py. The lent H200 runs CUDA 13 (driver 580, torch cu130), so the wheel is
# nvidia-dali-cuda130 (one DALI wheel per environment: setup.py's dali-cuda130 extra). It is far over one
# call's 64 MiB carry limit, so it travels in parts while the machine stays warm:
#   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#              -d /tmp/dw nvidia-dali-cuda130 && split -b 60M /tmp/dw/nvidia_dali_cuda130-*.whl .dali/part.
#   there: one call per part, each carrying only its .dali/part.xx:  mkdir -p /tmp/dali && cat .dali/part.* >> /tmp/dali/parts
#   last:  DALI_WHEEL=/tmp/dali/<the wheel's file name> (made by: mv /tmp/dali/parts "$DALI_WHEEL") bash tools/gpu_checks.sh OUT
# Without DALI on the machine the step reports that it did not run.
if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" dali_mixed "* ]]; then
    if [ -n "${DALI_WHEEL:-}" ] && [ -f "$DALI_WHEEL" ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$DALI_WHEEL" \
            || echo "gpu_checks: installing $DALI_WHEEL failed"
        case ":${PYTHONPATH:-}:" in *":/tmp/site:"*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} ;; esac
    fi
    if python3 -c "import nvidia.dali" 2> /dev/null; then
        step dali_mixed 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_images.py -k dali
    else
        echo "=== dali_mixed: NOT RUN (nvidia.dali does not import on this machine; see the comment above)"
    fi
fi
# ---- END DALI "mixed" decode --------------------------------------------------------------------------------

# ---- pebr plan vs measured memory (issue 16) ----------------------------------------------------------------
# The plan's memory model against torch.cuda.max_memory_allocated of bench_train_step's step and of one GRPO
# update of the actor (7B widths, 4+4v layers); rows go to docs/PERFORMANCE.md, "Memory plan vs measured".
step plan_memory 240 python3 tools/check_plan_memory.py --record docs/PERFORMANCE.md
# ---- end: pebr plan vs measured memory ----------------------------------------------------------------------
