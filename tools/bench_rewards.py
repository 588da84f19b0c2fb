#!/usr/bin/env python
"""Cost of grading under the reward guard: 4,096 ordinary answers, in-process vs the worker pool.

    python tools/bench_rewards.py [--num 4096] [--workers 1 2 4] [--write-docs]

"In-process" is what `RewardModel.score` did before the guard: each text reward called in a loop in the
trainer's process. "Pool" is `RewardModel.score` today (`pebr_mega.rewards.guard`): every sample's text
rewards in one worker call with a deadline. Both grade the same answers (a realistic mix of integers,
decimals, fractions, LaTeX, boxed answers, letters and words, about half of them right) with the stage-2
preset (accuracy + format) and the stage-1 text components (keyword, format, length, accuracy). The pool's
start-up (workers importing sympy) is paid once per process and reported apart. Median of --repeats runs.
The issue's budget: the pool may not be more than 2x slower than in-process. With --write-docs the table is
added to docs/PERFORMANCE.md ("Reward grading") with the CPU, date and commit.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from pebr_mega.parallel.threads import cpu_model  # noqa: E402

SECTION = "## Reward grading"
HEADER = ("| date | CPU (cores), load | commit | answers | preset | in-process s | workers | pool s | pool / in-process "
          "| start-up s | round trip us |\n|---|---|---|---|---|---|---|---|---|---|---|")


def ordinary_answers(num: int, seed: int = 0) -> list[tuple[str, str, list[str]]]:
    """(response, ground truth, key words): PeBR-format responses whose final answers look like real ones."""
    rng = random.Random(seed)

    def pair() -> tuple[str, str]:
        kind = rng.randrange(8)
        n = rng.randint(0, 120)
        if kind == 0:
            return str(n), str(n if rng.random() < 0.5 else n + 1)
        if kind == 1:
            x = round(rng.uniform(0, 100), 2)
            return f"{x}", f"{x if rng.random() < 0.5 else round(x + 0.5, 2)}"
        if kind == 2:
            a, b = rng.randint(1, 9), rng.randint(2, 12)
            return f"\\frac{{{a}}}{{{b}}}", f"{a}/{b}" if rng.random() < 0.5 else f"{a + 1}/{b}"
        if kind == 3:
            return f"$\\boxed{{{n}}}$", str(n if rng.random() < 0.5 else n + 2)
        if kind == 4:
            letter = rng.choice("ABCD")
            return f"({letter})", letter if rng.random() < 0.5 else rng.choice("ABCD")
        if kind == 5:
            word = rng.choice(["red", "blue", "yes", "no", "circle", "square"])
            return word, word if rng.random() < 0.5 else "green"
        if kind == 6:
            return f"{n} cm", f"{n}" if rng.random() < 0.5 else f"{n + 3}"
        a = rng.randint(1, 9)
        return f"{a}x + {n}", f"{n} + {a}x" if rng.random() < 0.5 else f"{a}x - {n}"

    out = []
    for i in range(num):
        given, truth = pair()
        colour, shape = rng.choice(["red", "blue", "green"]), rng.choice(["circles", "squares", "triangles"])
        text = (f"### Image Description: The image shows {rng.randint(1, 9)} {colour} {shape} on a grey background.\n"
                f"### Rationales: Count the {shape} and apply the question's rule.\n"
                f"### Step 1: There are several {colour} {shape}.\n"
                f"### Step 2: Apply the operation.\n### The final answer is: {given}")
        out.append((text, truth, [colour, shape, "background"]))
    return out


def _in_process(samples, components, cfg) -> float:
    """The pre-guard loop: every text reward of every sample, called here, each failure scored 0."""
    from pebr_mega.rewards.model import TEXT_REWARDS

    args = {"format": lambda s: (s.response,), "accuracy": lambda s: (s.response, s.answer),
            "keyword": lambda s: (s.response, s.key_words), "length": lambda s: (s.response_tokens, cfg.length_limit)}
    t0 = time.perf_counter()
    for name in components:
        for s in samples:
            try:
                float(TEXT_REWARDS[name](*args[name](s)))
            except Exception:  # noqa: BLE001 (as the old RewardModel._guarded)
                pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=4096)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=5.0)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)

    from pebr_mega.rewards import RewardConfig, build_reward
    from pebr_mega.rewards.guard import RewardPool
    from pebr_mega.rewards.model import RewardSample

    def batch(seed: int, num: int) -> list:
        return [RewardSample(response=t, response_tokens=len(t.split()), answer=a, key_words=k)
                for t, a, k in ordinary_answers(num, seed)]

    # Each repeat grades new answers (sympy caches what it parsed: a repeat of the same answers would be
    # cheaper in-process than in fresh workers, and a training step never sees the same answers twice).
    warm, repeats = batch(0, 64), [batch(r + 1, args.num) for r in range(args.repeats)]
    presets = {"stage2 (accuracy, format)": ("stage2", ["accuracy", "format"]),
               "stage1 text (keyword, format, length, accuracy)": ("stage1", ["keyword", "format", "length", "accuracy"])}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = f"{cpu_model()} ({os.cpu_count()}), load {load:.1f}"
    date = dt.date.today().isoformat()
    rows = []
    print(f"{args.num} ordinary answers on {cpu}, commit {commit}")
    for label, (stage, comps) in presets.items():
        cfg = RewardConfig(weights={"clip": 0.0} if stage == "stage1" else {}, timeout_s=args.timeout_s)
        models, startup, trip = {}, {}, {}
        for w in args.workers:
            pool = RewardPool(args.timeout_s, w, cfg.worker_memory_mb)
            t0 = time.perf_counter()
            pool.run([(abs, (-1,))])
            startup[w] = time.perf_counter() - t0
            models[w] = build_reward(cfg, stage, pool=pool)
            models[w].score(warm)
            t0 = time.perf_counter()
            pool.run([(abs, (-i,)) for i in range(args.num)])  # the pool's own cost: a call that does nothing
            trip[w] = (time.perf_counter() - t0) / args.num * 1e6
        _in_process(warm, comps, cfg)
        base_times, pool_times = [], {w: [] for w in args.workers}
        for samples in repeats:
            base_times.append(_in_process(samples, comps, cfg))
            for w, model in models.items():
                t0 = time.perf_counter()
                results = model.score(samples)
                pool_times[w].append(time.perf_counter() - t0)
                assert not any(r.timed_out for r in results), "an ordinary answer timed out"
        for model in models.values():
            model.pool.close()
        base = statistics.median(base_times)
        print(f"  {label}: in-process {base:.2f} s")
        for w in args.workers:
            t = statistics.median(pool_times[w])
            print(f"    pool, {w} worker(s): {t:.2f} s = {t / base:.2f}x in-process (start-up {startup[w]:.2f} s, "
                  f"round trip {trip[w]:.0f} us per call)")
            rows.append(f"| {date} | {cpu} | {commit} | {args.num} | {label} | {base:.2f} | {w} | {t:.2f} | "
                        f"{t / base:.2f}x | {startup[w]:.2f} | {trip[w]:.0f} |")
    if args.write_docs:
        from perf_docs import add_table_row

        for row in rows:
            add_table_row(ROOT / "docs" / "PERFORMANCE.md", SECTION, HEADER, row)
        print(f"added {len(rows)} rows to docs/PERFORMANCE.md ({SECTION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
