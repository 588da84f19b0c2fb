"""`pebr compare-logits`: the printed metrics, the exit status against the tolerance, and backend errors."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pebr(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pebr_mega", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_compare_logits_at_tp2_prints_metrics_and_fails_above_tolerance(tiny_model_dir):
    # A zero tolerance must fail (fp32 reorderings differ in the last bits), and the numbers must be tiny.
    r = _pebr("compare-logits", "--hf-dir", tiny_model_dir, "--tp", "2", "--tolerance", "0")
    assert r.returncode == 1, r.stderr[-3000:]
    m = re.search(r"max_abs_diff=(\S+) mean_abs_diff=(\S+) cosine=(\S+) top1_agreement=(\S+)", r.stdout)
    assert m, r.stdout
    max_abs, mean_abs, cosine, top1 = map(float, m.groups())
    assert 0 < max_abs < 1e-4 and mean_abs <= max_abs and cosine > 0.999999 and top1 == 1.0
    assert "FAIL" in r.stdout and "tp=2 pp=1" in r.stdout


def test_compare_logits_with_te_on_cpu_is_a_one_line_error(tiny_model_dir):
    import torch

    from pebr_mega.models.specs import te_available

    if te_available() and torch.cuda.is_available():
        pytest.skip("Transformer Engine is usable here")
    r = _pebr("compare-logits", "--hf-dir", tiny_model_dir, "--spec", "te")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "pebr compare-logits: error:" in r.stderr
