"""Issue 23 ("nothing lost, nothing silently wrong, round two"), reproduced where the user meets it: the `pebr`
command and the checkpoint tools, in real processes where the case is about processes.

- a run directory whose first checkpoint came before any applied update resumes (item 1);
- two processes on one output directory: the second is refused naming the first, a kill -9 leaves no lock
  that blocks a rerun (item 2);
- a damaged checkpoint is refused by every reader (item 3);
- a diverged run stops with one line and exports nothing as final (item 5);
- ordinary OS errors are one line naming the path and the operation (item 7);
- the dry run fails where the run does; an interrupted export leaves no temporary; weights get the usual
  file mode (item 10).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pebr_mega.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny synthetic set (grpo.json, sft.json, eval.json, images/), written by `pebr synth`."""
    out = tmp_path_factory.mktemp("data") / "synth"
    assert main(["synth", "--out", str(out), "--num", "8", "--num-sft", "8", "--num-eval", "2"]) == 0
    return out


def tiny_train(run: Path, model: Path, train_file: Path, *extra: str) -> list[str]:
    """`pebr train` of a tiny GRPO stage (2 prompts per step, one update each, a checkpoint every step)."""
    return ["train", f"run.output_dir={run}", "model.spec=torch", "model.params_dtype=float32",
            "images.min_pixels=3136", "images.max_pixels=50176", "logging.progress_bar=false", "rollout.n=2",
            "rollout.max_new_tokens=8", "actor.micro_batch_tokens=2048", "grpo.stage=stage2",
            f"grpo.init_model={model}", f"grpo.train_file={train_file}", "grpo.rollout_batch_size=2",
            "grpo.mini_batch_size=2", "grpo.max_steps=2", "grpo.save_every=1", "grpo.shuffle=false",
            "actor.lr=1e-3", "rewards.num_workers=1", *extra]


def tiny_sft(run: Path, model: Path, data: Path, *extra: str) -> list[str]:
    """`pebr sft` of a tiny warm-up (batches of 4, one epoch, a checkpoint every step)."""
    return ["sft", f"run.output_dir={run}", "model.spec=torch", "model.params_dtype=float32",
            "images.min_pixels=3136", "images.max_pixels=50176", "logging.progress_bar=false",
            "actor.micro_batch_tokens=2048", f"sft.init_model={model}", f"sft.train_file={data / 'sft.json'}",
            "sft.batch_size=4", "sft.epochs=1", "sft.save_every=1", *extra]


# The child that runs `pebr` commands in turn (kill_resume.run_child: `pebr_mega.cli.main` in a forked child,
# SIGKILLed by itself at a kill point when asked), in a fresh interpreter: a run initialises a process group,
# which the pytest process must not.
_CHILD = """
import json, sys
from pathlib import Path
import kill_resume
kill_resume.preload()
runs = json.loads(sys.argv[1])
print(json.dumps([kill_resume.run_child(argv, Path(log), tuple(kill) if kill else None) for argv, log, kill in runs]))
"""


def run_in_children(runs: list[tuple[list[str], Path, tuple | None]]) -> list[dict]:
    """Each (argv, log, kill) as `kill_resume.run_child` runs it, one after the other; what each reported."""
    payload = json.dumps([(argv, str(log), kill) for argv, log, kill in runs])
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ": error: " in line]


# ------------------------------------------------------------------ item 1: a checkpoint before any update
def test_checkpoint_saved_before_the_first_update_resumes(dataset, tiny_model_dir, tmp_path):
    """The issue's reproduction: the first batch's images are cut after their headers, so no request of it can
    be built and step 1 trains nothing; step_1 is saved (Adam has no state yet); the run is SIGKILLed while it
    saves step 2; the rerun resumes from step_1 and finishes (it used to fail on every rerun with
    `KeyError: 'optimizer.state.exp_avg...'`)."""
    records = json.loads((dataset / "grpo.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    for i, r in enumerate(records):
        data = (dataset / r["images"][0]).read_bytes()
        (images / Path(r["images"][0]).name).write_bytes(data[:120] if i < 2 else data)  # batch 1: headers only
        r["images"] = [f"images/{Path(r['images'][0]).name}"]
    train_file = tmp_path / "grpo.json"
    train_file.write_text(json.dumps(records))
    argv = tiny_train(tmp_path / "run", tiny_model_dir, train_file)
    killed, rerun = run_in_children([(argv, tmp_path / "killed.log", ("save", 2)),
                                     (argv, tmp_path / "rerun.log", None)])
    assert killed["killed"], killed["log"]
    assert "no request of the batch could be built" in killed["log"]
    assert rerun["rc"] == 0 and "Traceback" not in rerun["log"], rerun["log"]
    assert "resumed from" in rerun["log"] and "(step 1)" in rerun["log"], rerun["log"]
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()
