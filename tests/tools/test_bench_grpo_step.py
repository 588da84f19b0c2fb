"""tools/bench_grpo_step.py at toy size on CPU: the benchmark's code path runs end to end (both actors, all
three phases) and its two actors agree on the log-probs of the same random model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_grpo_step_runs_at_toy_size_on_cpu(tmp_path):
    out = tmp_path / "summary.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_grpo_step.py"), "--model", "tiny", "--device",
                           "cpu", "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(out.read_text())
    for impl in ("pebr-mega", "transformers"):
        for phase in ("old log-probs", "ref log-probs", "update"):
            assert summary[f"{impl}/{phase}/s"] > 0
    # float32 on CPU: the packed Megatron actor and transformers' padded batches, same weights
    assert summary["old_logprobs_max_abs_diff"] < 1e-3
    assert "| update | pebr-mega |" in proc.stdout and "| update | transformers |" in proc.stdout
