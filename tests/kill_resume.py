"""SIGKILL a `pebr` command at chosen points, rerun it until it finishes, and compare with an uninterrupted run.

Used by the `kills` job of tests/trainer_scenarios.py (a few fixed points per command, in CI) and by
tools/soak_kill_resume.py (many seeded random points). Each run of the command is `pebr_mega.cli.main(argv)`
in a child forked from a parent that has imported the heavy libraries once (the start-up of a fresh
interpreter would dominate the test's time); the child is the process that is killed, with a real SIGKILL
sent by itself at a kill point, and its own children (reward workers, Megatron's writer manager) die with
it as they do after any kill. The parent never initialises process groups or runs a model.

A kill point is a function of the library and the n-th time the run calls it (`KILL_POINTS`): in an actor
update, during a checkpoint save (every file written, the manifest not yet), right after a metrics row,
before a pipeline stage's DONE file, in the middle of sampling. The soak tool adds kills after a random
delay, from outside, anywhere.

What must hold (`check_prefix`, `compare_runs`): after every kill, the rows in each `metrics.jsonl` are a
prefix of the uninterrupted run's (no step twice, no stale step); when the command finishes, every file
that records the run (metrics, generations, results, rollouts, splits) equals the uninterrupted run's, up
to timings and the run directory's path, and the exported weights are equal bit for bit.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

# name -> (module, attribute path, when): the call that is counted, and whether the kill comes on entering
# it or on leaving it.
KILL_POINTS: dict[str, tuple[str, str, str]] = {
    "update": ("pebr_mega.actor.megatron_actor", "MegatronActor.train_step", "enter"),
    "save": ("pebr_mega.run.stage_checkpoints", "write_manifest", "enter"),
    "metrics": ("pebr_mega.logging", "MetricsLogger.log", "exit"),
    "generate": ("pebr_mega.rollout.hf_engine", "HFRolloutEngine.generate", "enter"),
    "done": ("pebr_mega.recipe.pipeline", "_mark_done", "enter"),
    "export": ("pebr_mega.trainer.stage", "export_to_hf", "enter"),
}
# Calls that build a model (counted, to show that an error came before any).
BUILDS = {"build_actor": ("pebr_mega.trainer.stage", "build_actor"),
          "make_rollout_engine": ("pebr_mega.trainer.stage", "make_rollout_engine")}
# Metrics that measure the machine, not the computation.
TIMING = ("time/", "tokens_per_s", "tflops", "mfu", "wall")
RECORD_FILES = ("metrics.jsonl", "generations.jsonl", "result.json", "DONE", "rollouts.jsonl", "easycase.json",
                "mediumcase.json", "hardcase.json", "summary.json")


def preload() -> None:
    """Import what every run needs, once, in the parent (a fork inherits it)."""
    import torch

    torch.set_num_threads(1)
    for module in ("pebr_mega.cli", "pebr_mega.recipe.pipeline", "pebr_mega.trainer.grpo", "pebr_mega.trainer.sft",
                   "pebr_mega.actor.megatron_actor", "pebr_mega.rollout.hf_engine", "pebr_mega.rewards.guard",
                   "megatron.core.dist_checkpointing", "transformers"):
        importlib.import_module(module)


def _wrap(module: str, path: str, on_call: Callable[[int], None], when: str) -> None:
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if when == "enter":
            on_call(calls["n"])
        out = original(*args, **kwargs)
        if when == "exit":
            on_call(calls["n"])
        return out

    setattr(owner, name, wrapper)


def _kill_self(_n: int = 0) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def run_child(argv: Sequence[str], log: Path, kill: tuple[str, float] | None = None) -> dict:
    """Run `pebr <argv>` in a forked child, SIGKILLed at `kill` = (point, n) if the run gets there, or, with
    `kill` = ("after", seconds), by this process after that long (anywhere: the soak tool's kills).

    Returns {"killed": bool, "rc": exit status or None, "counts": calls of each kill point and model build
    (from a run that was not killed), "log": the tail of its output}.
    """
    counts_file = log.with_suffix(".counts.json")
    counts_file.unlink(missing_ok=True)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 1
        try:
            from pebr_mega.lifetime import die_with_parent

            die_with_parent()  # a job that is stopped takes its run with it
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
                os.environ.pop(key, None)  # a fresh one-rank world per run
            counts: dict[str, int] = {}

            def counter(name):
                def count(n):
                    counts[name] = n
                return count

            for name, (module, path, when) in KILL_POINTS.items():
                _wrap(module, path, counter(name), when)
            for name, (module, path) in BUILDS.items():
                _wrap(module, path, counter(name), "enter")
            if kill is not None and kill[0] != "after":
                point, nth = kill
                module, path, when = KILL_POINTS[point]
                _wrap(module, path, lambda n: _kill_self() if n == nth else None, when)
            from pebr_mega.cli import main

            rc = main(list(argv))
            counts_file.write_text(json.dumps(counts))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    done, status = 0, 0
    if kill is not None and kill[0] == "after":
        deadline = time.monotonic() + float(kill[1])
        while not done and time.monotonic() < deadline:
            time.sleep(0.05)
            done, status = os.waitpid(pid, os.WNOHANG)
        if not done:
            os.kill(pid, signal.SIGKILL)
    if not done:
        _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    counts = json.loads(counts_file.read_text()) if counts_file.is_file() else {}
    return {"killed": killed, "rc": rc, "counts": counts, "log": log.read_text(errors="replace")[-4000:]}


# ---------------------------------------------------------------------------------------------- comparing
def comparable_rows(path: Path) -> list[dict]:
    """The rows of a metrics/generations file without the machine's timings."""
    from pebr_mega.logging import read_metrics

    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in read_metrics(path)]


def _normalised_json(path: Path, root: Path) -> object:
    """A result file with the run's root folder replaced and its durations dropped."""
    data = json.loads(path.read_text().replace(str(root), "<root>"))

    def strip(v):
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "seconds"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(data)


def record_files(root: Path) -> dict[str, Path]:
    """Every file that records what a run computed, by its path relative to `root`."""
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*"))
            if p.is_file() and p.name in RECORD_FILES and "checkpoints" not in p.parts}


def check_prefix(root: Path, reference: Path) -> list[str]:
    """Problems: a metrics file under `root` whose rows are not a prefix of the reference run's."""
    problems = []
    for rel, path in record_files(root).items():
        if path.name != "metrics.jsonl":
            continue
        got, want = comparable_rows(path), comparable_rows(reference / rel)
        if got != want[:len(got)]:
            steps = [r.get("step") for r in got]
            problems.append(f"{rel}: rows (steps {steps}) are not a prefix of the uninterrupted run's")
    return problems


def compare_runs(root: Path, reference: Path) -> list[str]:
    """Problems: a record file or exported weights of `root` that differ from the reference run's."""
    problems = []
    mine, theirs = record_files(root), record_files(reference)
    if sorted(mine) != sorted(theirs):
        problems.append(f"files differ: {sorted(set(mine) ^ set(theirs))}")
    for rel in sorted(set(mine) & set(theirs)):
        a, b = mine[rel], theirs[rel]
        if a.suffix == ".jsonl" and a.name != "rollouts.jsonl":
            same = comparable_rows(a) == comparable_rows(b)
        elif a.name in ("result.json", "DONE", "summary.json"):
            same = _normalised_json(a, root) == _normalised_json(b, reference)
        else:
            same = a.read_bytes() == b.read_bytes()
        if not same:
            problems.append(f"{rel} differs from the uninterrupted run's")
    for rel in sorted(str(p.relative_to(reference)) for p in reference.rglob("model.safetensors")
                      if "checkpoints" not in p.parts):
        if not _same_weights(root / rel, reference / rel):
            problems.append(f"{rel}: weights differ from the uninterrupted run's")
    return problems


def _same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    if not a.is_file():
        return False
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


# ---------------------------------------------------------------------------------------------- a chain
def kill_chain(argv: Sequence[str], root: Path, reference: Path, kills: Sequence[tuple[str, int]], logs: Path,
               require_reached: bool = True, max_runs: int = 20) -> dict:
    """Run `argv` (writing under `root`), killed at each of `kills` in turn, then rerun until it finishes.

    After every kill the metrics must be a prefix of the reference run's (in `reference`); when a run
    finishes, every record and the weights must equal it. A kill point that a run finishes without reaching
    is a problem when `require_reached` (the remaining ones are then dropped). Returns {"runs": [...],
    "problems": [...]}: each run's kill point, whether the kill happened, and its exit status.
    """
    runs, problems = [], []
    pending = list(kills)
    for i in range(max_runs):
        kill = pending.pop(0) if pending else None
        out = run_child(argv, logs / f"run{i}.log", kill)
        runs.append({"kill": kill, "killed": out["killed"], "rc": out["rc"]})
        if out["killed"]:
            problems += [f"after kill {kill}: {p}" for p in check_prefix(root, reference)]
            continue
        if out["rc"] != 0:
            problems.append(f"run {i} (kill point {kill}) exited with {out['rc']}:\n{out['log']}")
        else:
            if kill is not None and require_reached:
                problems.append(f"run {i} finished without reaching the kill point {kill}")
            problems += compare_runs(root, reference)
        break
    else:
        problems.append(f"the command did not finish in {max_runs} runs")
    return {"runs": runs, "problems": problems}
