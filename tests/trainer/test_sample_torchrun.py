"""`pebr sample` under `torchrun --nproc-per-node 2` (CPU, gloo): one complete output file, written once.

Before, the command never joined the launcher's job: every rank started its own engine (on GPU 0, port
30000, with SGLang), sampled everything and wrote and replaced the same output file. Here both ranks join
the job's process group (gloo on CPU, the rank's own GPU and NCCL on a GPU machine: `init_distributed`),
rank 0 alone writes, and the file holds exactly n lines per question, the same lines a single process writes
with the same seed. (The per-GPU engine ports are `sglang_engine.engine_port` of the rank's device, tested in
tests/rollout/test_sglang_engine.py; a CPU run has no GPU index to show.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _dataset(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (56, 56 + 28 * i, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    rows = [{"qid": f"q{i}", "problem": f"<image>How many shapes? ({i})", "answer": str(i % 3),
             "images": [f"{i % 2}.png"], "key_words": []} for i in range(3)]
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(rows))
    return path


def _sample(tmp_path: Path, model: Path, data: Path, out: str, launcher: list[str]) -> subprocess.CompletedProcess:
    overrides = [f"sample.model={model}", f"sample.dataset={data}", f"sample.output={tmp_path / out}", "sample.n=2",
                 "sample.batch_size=2", "sample.max_pixels=50176", "images.min_pixels=3136",
                 "images.max_pixels=50176", "rollout.max_new_tokens=6", "rollout.engine=hf", "run.seed=3",
                 "logging.progress_bar=false", "rewards.num_workers=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*launcher, "-m", "pebr_mega", "sample", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_pebr_sample_under_torchrun_writes_one_complete_file(tiny_model_dir, tmp_path):
    data = _dataset(tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    job = _sample(tmp_path, tiny_model_dir, data, "job.jsonl", torchrun)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    single = _sample(tmp_path, tiny_model_dir, data, "single.jsonl", [sys.executable])
    assert single.returncode == 0, single.stderr[-3000:]

    lines = (tmp_path / "job.jsonl").read_text().splitlines()
    assert [json.loads(line)["qid"] for line in lines] == ["q0", "q0", "q1", "q1", "q2", "q2"]
    assert lines == (tmp_path / "single.jsonl").read_text().splitlines()  # same seeds, same answers
    assert not list(tmp_path.glob("*.tmp"))
    # both ranks finished with the summary (rank 0's), printed once, by the writer
    assert job.stdout.count("sampled 6 answers for 3 questions") == 1
    assert job.stdout.count("sampling done:") == 2
