"""tools/bench_train_step.py --smoke on CPU: the benchmark's code path (build, forward + backward, the table
row) runs end to end, so the GPU run in tools/gpu_checks.sh does not spend device time on a script error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_train_step_smoke_runs_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train_step.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    row = [line for line in proc.stdout.splitlines() if "cpu (smoke)" in line]
    assert len(row) == 1, proc.stdout
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[2] == "2+2v" and cells[3] == "256" and float(cells[8]) > 0  # layers, seq, ms/step
