#!/usr/bin/env python
"""Soak test: SIGKILL a tiny `pebr train` or `pebr pipeline` at random points, many times, and check that
every rerun chain ends in exactly the uninterrupted run's records and weights.

    python tools/soak_kill_resume.py [--command train|pipeline|both] [--rounds 20] [--kills 1 3] [--seed 0]
                                     [--out DIR] [--keep]

The CI's `kills` job (tests/trainer_scenarios.py) kills each command at a few fixed points; this tool draws
the points at random from the same machinery (tests/kill_resume.py): each round runs one chain of 1-3 kills
(`--kills`), each kill either at the n-th call of a kill point (an actor update, between a checkpoint's
files and its manifest, right after a metrics row, in a rollout, before a pipeline stage's DONE file, before
an export), n drawn up to the uninterrupted run's count, or from outside after a random delay (anywhere, up
to 0.6 of the uninterrupted run's wall time). After every kill the metrics must be a prefix of the uninterrupted
run's; the finished chain must equal it (`kill_resume.compare_runs`). Rounds are seeded (`--seed`): a failing
round is reproduced by its seed, printed with the problem. Exits 1 when any round failed.

Cost: one round of `train` is a few runs of about 10 s each on 2 cores (the tiny model, 4 steps); a
`pipeline` round about 3x that.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the runs are forked after a tokenizer is trained


def draw_kills(rng: random.Random, counts: dict[str, int], wall_s: float, n: int) -> list[tuple[str, float]]:
    """`n` kill points: ("after", seconds) or (point, k) with k up to the uninterrupted run's calls of it."""
    points = sorted(p for p, c in counts.items() if c > 0 and p in KILL_POINTS)
    kills: list[tuple[str, float]] = []
    for _ in range(n):
        if rng.random() < 0.4 or not points:
            # The first (measured) run is the slowest (cold caches): later runs take about half of it.
            kills.append(("after", round(rng.uniform(0.5, 0.6 * wall_s), 2)))
        else:
            point = rng.choice(points)
            kills.append((point, rng.randint(1, counts[point])))
    return kills


def soak(command: str, rounds: int, kill_range: tuple[int, int], seed: int, out: Path, model: Path,
         data: Path) -> int:
    """Run `rounds` seeded kill chains of `command`; returns how many failed."""
    argv_of = train_argv if command == "train" else pipeline_argv
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ref = run_child(argv_of(out / "ref", model, data), logs / "ref.log")
    wall = time.monotonic() - t0
    if ref["rc"] != 0:
        raise SystemExit(f"the uninterrupted {command} run failed:\n{ref['log']}")
    print(f"{command}: uninterrupted run {wall:.1f} s, calls {ref['counts']}", flush=True)
    failed = 0
    for i in range(rounds):
        rng = random.Random(seed * 100_003 + i)
        kills = draw_kills(rng, ref["counts"], wall, rng.randint(*kill_range))
        root = out / f"round{i}"
        round_logs = logs / f"round{i}"
        round_logs.mkdir(exist_ok=True)
        got = kill_chain(argv_of(root, model, data), root, out / "ref", kills, round_logs, require_reached=False)
        happened = [tuple(r["kill"]) for r in got["runs"] if r["killed"]]
        status = "ok" if not got["problems"] else "FAILED"
        print(f"{command} round {i} (seed {seed}, kills {kills}): {len(got['runs'])} runs, killed at {happened}: "
              f"{status}", flush=True)
        for p in got["problems"]:
            print(f"    {p}", flush=True)
        failed += bool(got["problems"])
        if not got["problems"]:
            shutil.rmtree(root, ignore_errors=True)
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--command", choices=["train", "pipeline", "both"], default="train")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--kills", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    import torch

    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model

    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="pebr_soak_"))
    out.mkdir(parents=True, exist_ok=True)
    model = Path(build_tiny_model(out / "model", TinyModelConfig(seed=0), tokenizer_corpus()))
    data = Path(write_synthetic_dataset(out / "synth", SynthConfig(num=12, num_sft=16, num_eval=4, seed=3)).out_dir)
    preload()
    failed = 0
    for command in (["train", "pipeline"] if args.command == "both" else [args.command]):
        failed += soak(command, args.rounds, tuple(args.kills), args.seed, out / command, model, data)
    print(f"{failed} failed round(s)" + (f"; logs under {out}" if failed or args.keep else ""))
    if not (failed or args.keep or args.out):
        shutil.rmtree(out, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    from kill_resume import KILL_POINTS, kill_chain, preload, run_child  # noqa: E402  (tests/ is on the path)
    from trainer_scenarios import pipeline_argv, train_argv  # noqa: E402

    raise SystemExit(main())
