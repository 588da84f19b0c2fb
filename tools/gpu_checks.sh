#!/usr/bin/env bash
# The GPU checks of the project, in order of value, inside ONE lent call (at most 560 s) by their own deadline.
#
#     bash tools/gpu_wheels.sh            # here, once: the carry folder .whl/ (under 64 MiB), see that script
#     bash tools/gpu_checks.sh OUT_DIR    # there: run(command=..., carry=[".whl"], timeout_s=560)
#
# Deadline arithmetic: BUDGET_S (default 540 s) is the whole script, 20 s under the call's 560 s for the
# start and the return of OUT_DIR. Every step runs under `timeout -k KILL_AFTER_S LIMIT` (10 s), where LIMIT
# is the smaller of its own limit and what is left of the budget less RESERVE_S (15 s: the kill grace, then
# at most 4 s of reaping and the step's last lines); a step with under MIN_STEP_S (15 s) left is reported
# SKIPPED, never started. So the script ends by start + BUDGET_S, whatever hangs (RESERVE_S must stay at
# least KILL_AFTER_S + 5).
#
# Steps (the first call; each line's limit in seconds):
#   header          15  the card, the driver, the library versions
#   wheels          60  install the carried .whl/*.whl into /tmp/site, then import every package the steps need;
#                       a missing or broken one is listed and the steps go on (tests needing it skip)
#   tests          180  every gpu-marked test, --continue-on-collection-errors (one broken import costs only
#                       its own file)
#   torchrun_train 110  tools/gpu_train_check.sh: `pebr train` 2 GRPO steps of the tiny model on one GPU via
#                       launch/torchrun.sh (torchrun env, NCCL start-up, the HF engine's release / resume /
#                       sync on real CUDA memory, a checkpoint, the export)
#   ipc_bucket      45  tools/check_ipc_bucket.py: a 256 MiB bucket through CUDA IPC to a spawned process with
#                       SGLang's serializer, memory back after ipc_collect
#   kernels         80  tools/bench_kernels.py --write-docs
#   grpo_step      what is left: tools/bench_grpo_step.py at 16 prompts (BENCH_GRPO_ARGS adds arguments)
# Second call (ONLY="train_step plan_memory dali_mixed"): the train-step benchmark, the plan-vs-measured memory
# and DALI's GPU decode (its wheel is over the carry limit: see the dali_mixed block).
#
# Kills: `timeout` signals its child's process group; torchrun's workers and SGLang's schedulers start in
# their own sessions, out of that group, so every step also runs with PEBR_GPU_STEP=<step>.<pid> in its
# environment (inherited by every descendant) and `reap` kills whatever still carries it when the step ends.
# The benchmarks append to docs/PERFORMANCE.md, copied to OUT_DIR after every step with the logs.
# CHECK_STEPS_FILE (tests only) replaces the step list with the file's lines `NAME LIMIT COMMAND...`.
set -u
OUT_DIR=${1:?usage: bash tools/gpu_checks.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
RESERVE_S=${RESERVE_S:-15}
MIN_STEP_S=${MIN_STEP_S:-15}
KILL_AFTER_S=${KILL_AFTER_S:-10}
DEADLINE=$((START + BUDGET_S))
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
# This checkout first, then the carried wheels (an editable install would need an index).
export WHEEL_DIR=${WHEEL_DIR:-.whl} SITE=${SITE:-/tmp/site}
export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}

note() { echo "$*" | tee -a "$SUMMARY"; }

reap() {  # reap MARKER: TERM, then KILL, every process whose environment carries PEBR_GPU_STEP=MARKER
    local marker=$1 pids pid round
    for round in TERM KILL; do
        pids=""
        for pid in $(ls /proc | grep -E '^[0-9]+$'); do
            [ "$pid" = "$$" ] && continue
            if tr '\0' '\n' 2> /dev/null < "/proc/$pid/environ" | grep -qx "PEBR_GPU_STEP=$marker"; then
                pids="$pids $pid"
            fi
        done
        [ -z "$pids" ] && return 0
        note "    reap $marker: SIG$round to$pids"
        # shellcheck disable=SC2086  # a list of pids
        kill -s "$round" $pids 2> /dev/null
        sleep 2
    done
}

step() {  # step NAME LIMIT COMMAND...: under the deadline, log to OUT_DIR/NAME.log, print its tail
    local name=$1 limit=$2 left rc start marker
    shift 2
    # header and wheels run in every call (a second call needs the carried wheels installed too)
    if [ -n "${ONLY:-}" ] && [[ " $ONLY header wheels " != *" $name "* ]]; then return 0; fi
    left=$((DEADLINE - $(date +%s) - RESERVE_S))
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        note "=== $name: SKIPPED (deadline: $((DEADLINE - $(date +%s))) s of the budget left)"
        return 0
    fi
    [ "$limit" = "rest" ] || [ "$limit" -gt "$left" ] && limit=$left
    marker="$name.$$"
    start=$(date +%s)
    echo "=== $name (limit $limit s): $*"
    PEBR_GPU_STEP=$marker timeout -k "$KILL_AFTER_S" "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    reap "$marker"
    case $rc in
        124|137) note "=== $name: TIMED OUT after $(( $(date +%s) - start )) s (limit $limit s)" ;;
        *) note "=== $name: rc $rc in $(( $(date +%s) - start )) s" ;;
    esac
    tail -n "${TAIL:-30}" "$OUT_DIR/$name.log"
    [ -f docs/PERFORMANCE.md ] && cp docs/PERFORMANCE.md "$OUT_DIR/PERFORMANCE.md"
    return 0
}

wheels() {  # the carried wheels installed, then every module the steps import, one line each
    if compgen -G "$WHEEL_DIR/*.whl" > /dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEEL_DIR"/*.whl || echo "wheels: installing $WHEEL_DIR failed"
    else
        echo "wheels: no $WHEEL_DIR folder carried (bash tools/gpu_wheels.sh builds it)"
    fi
    python3 - <<'EOF'
import importlib, importlib.metadata as md
failed = []
for module, dist in [("pebr_mega.kernels.ops", None), ("torch", "torch"), ("triton", "triton"),
                     ("transformers", "transformers"), ("megatron.core", "megatron-core"),
                     ("omegaconf", "omegaconf"), ("mathruler", "mathruler"), ("flash_attn", "flash-attn"),
                     ("transformer_engine.pytorch", "transformer-engine"), ("sglang", "sglang")]:
    try:
        importlib.import_module(module)
        version = md.version(dist) if dist else "checkout"
        print(f"wheels: {module} imports ({version})")
    except Exception as e:  # reported, not fatal: the steps that need it skip
        failed.append(module)
        print(f"wheels: {module} does NOT import: {type(e).__name__}: {str(e)[:200]}")
print("wheels: missing:", ", ".join(failed) or "none")
EOF
}

header() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
}

export -f wheels header
if [ -n "${CHECK_STEPS_FILE:-}" ]; then
    while read -r name limit cmd; do
        [ -z "$name" ] && continue
        step "$name" "$limit" bash -c "$cmd"
    done < "$CHECK_STEPS_FILE"
else
    TAIL=5 step header 15 bash -c header
    TAIL=15 step wheels 60 bash -c wheels
    TAIL=40 step tests 180 python3 -m pytest -q -m gpu -p no:cacheprovider -rs --continue-on-collection-errors tests/
    TAIL=20 step torchrun_train 110 bash tools/gpu_train_check.sh /tmp/pebr_gpu_train
    TAIL=10 step ipc_bucket 45 python3 tools/check_ipc_bucket.py --mb 256
    TAIL=45 step kernels 80 python3 tools/bench_kernels.py --write-docs
    # shellcheck disable=SC2086  # BENCH_GRPO_ARGS is a list of arguments
    TAIL=25 step grpo_step rest python3 tools/bench_grpo_step.py --model 7b-shaped --layers 4 --device cuda \
        --prompts 16 --record docs/PERFORMANCE.md --json "$OUT_DIR/grpo_step.json" ${BENCH_GRPO_ARGS:-}
    # ---- the second call: ONLY="train_step plan_memory dali_mixed" bash tools/gpu_checks.sh OUT -------------
    if [ -n "${ONLY:-}" ]; then
        step train_step 100 python3 tools/bench_train_step.py --record docs/PERFORMANCE.md
        # pebr plan vs measured memory (issue 16): rows go to docs/PERFORMANCE.md, "Memory plan vs measured".
        step plan_memory 240 python3 tools/check_plan_memory.py --record docs/PERFORMANCE.md
        # DALI's GPU decode (nvJPEG, device "mixed") against its CPU pipeline. The wheel (nvidia-dali-cuda130 on
        # CUDA 13) is far over one call's 64 MiB carry, so it travels in parts while the machine stays warm:
        #   here:  pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        #              -d /tmp/dw nvidia-dali-cuda130 && split -b 60M /tmp/dw/nvidia_dali_cuda130-*.whl .dali/part.
        #   there: one call per part, each carrying only its .dali/part.xx:  mkdir -p /tmp/dali && cat .dali/part.* >> /tmp/dali/parts
        #   last:  DALI_WHEEL=/tmp/dali/<the wheel's file name> (made by: mv /tmp/dali/parts "$DALI_WHEEL")
        if [ -n "${DALI_WHEEL:-}" ] && [ -f "$DALI_WHEEL" ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "$DALI_WHEEL" || note "gpu_checks: installing $DALI_WHEEL failed"
        fi
        if python3 -c "import nvidia.dali" 2> /dev/null; then
            step dali_mixed 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/data/test_images.py -k dali
        elif [[ " $ONLY " == *" dali_mixed "* ]]; then
            note "=== dali_mixed: NOT RUN (nvidia.dali does not import on this machine; see the comment above)"
        fi
    fi
fi
note "=== gpu_checks: done in $(( $(date +%s) - START )) s (budget $BUDGET_S s)"
