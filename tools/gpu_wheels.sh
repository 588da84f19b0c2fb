#!/usr/bin/env bash
# Build the carry folder .whl/ for tools/gpu_checks.sh: the wheels a lent GPU machine lacks (it has torch 2.11
# with CUDA 13, triton 3.6 and Python 3.12, and no network), under the 64 MiB a call may carry.
#
#     bash tools/gpu_wheels.sh            # here (PyPI reachable); then run(..., carry=[".whl"])
#
# Binary wheels come from `pip download --no-deps` for CPython 3.12 on x86-64 manylinux; the two sdists
# (antlr4-python3-runtime, which omegaconf needs, and pylatexenc, which mathruler imports) are built into pure
# wheels here. Not carried: flash-attn (sdist only on PyPI, built against the machine's CUDA), Transformer
# Engine, SGLang with its kernels and DALI (each far over the limit; DALI's route is in tools/gpu_checks.sh).
# The script fails when the folder would not fit (LIMIT_MB, default 60: room for the checkout itself).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
LIMIT_MB=${LIMIT_MB:-60}
PY_VERSION=${PY_VERSION:-3.12}
BINARY=(megatron-core==0.16.1 transformers==5.24.0 omegaconf==2.3.0 mathruler==0.1.0 liger-kernel einops psutil)
SOURCE=(antlr4-python3-runtime==4.9.3 pylatexenc==2.10)
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "${BINARY[@]}"
python3 -m pip wheel -q --no-deps -w "$DEST" "${SOURCE[@]}"
size_kb=$(du -sk "$DEST" | cut -f1)
ls -l "$DEST"
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $((size_kb / 1024)) MiB in $DEST (limit $LIMIT_MB MiB)"
if [ "$size_kb" -gt $((LIMIT_MB * 1024)) ]; then
    echo "gpu_wheels: $DEST is over $LIMIT_MB MiB: drop a wheel (the checks that need it will skip)" >&2
    exit 1
fi
