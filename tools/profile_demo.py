#!/usr/bin/env python3
"""Where `pebr demo`'s time goes: wall time per stage and per phase, threads alive, and the code that runs.

    python tools/profile_demo.py --out runs/profile_seed0 --seed 0          # the README's demo, profiled
    python tools/profile_demo.py --out /tmp/p --toy                          # seconds: CI's size
    python tools/profile_demo.py --out runs/p -- --num-grpo 256 rollout.n=4  # after --: `pebr demo` arguments

It runs `pebr demo` in this process (the same `pebr_mega.cli.main` a user runs) while a sampling thread
reads the main thread's Python stack every `--interval` seconds. Each sample is filed three ways:
  stage  the outermost recipe step on the stack (tiny CLIP, SFT, sampling, stage 1, stage 2, export, ...);
  phase  the innermost step of a stage's work (rollout generation, old log-probs, update, reward,
         evaluation, checkpoint save, weight sync, CLIP training, set-up);
  code   the file group of the innermost Python frame: where the interpreter is, C calls made from that
         frame included (a torch op called from Megatron's Python counts as Megatron's), so a group whose
         share is far above its arithmetic (the CPU compatibility layer, transformers' generation loop,
         the tokenizer) is Python overhead on a 1 M-parameter model.
It also reads the process's thread count (`/proc/self/status`, native threads included: gloo, OpenMP) on
every sample, and writes `profile.json` beside the demo's `summary.json`: seconds per stage (sampled) with
the pipeline's own measured seconds, phases, code groups, threads at start and at most per stage, and the
machine and versions (`summary.json["environment"]`). Sampling costs the demo a few per cent.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

# Function names on the stack -> the recipe step they belong to (outermost match wins).
STAGES = {
    "build_tiny_model": "assets", "write_synthetic_dataset": "assets", "prepare_clip": "clip",
    "_run_sft": "sft", "_run_sample": "sample", "_run_split": "split", "_run_stage1": "stage1",
    "_run_stage2": "stage2", "_run_export": "export", "plot_demo": "report", "_cmd_infer": "report",
}
STAGE_ORDER = ("assets", "clip", "sft", "sample", "split", "stage1", "stage2", "export", "report", "other")
# (function name, file name fragment) -> phase (innermost match wins); "" matches any file.
PHASES = (
    ("_train", "clip_training", "clip training"), ("retrieval_metrics", "", "clip evaluation"),
    ("build_actor", "", "set-up"), ("build_engine", "", "set-up"), ("build_reward", "", "set-up"),
    ("from_pretrained", "", "set-up"), ("load_stage_records", "", "set-up"), ("build", "requests", "requests"),
    ("generate", "engine", "generate"), ("compute_logprobs", "", "log-probs"), ("train_step", "megatron_actor", "update"),
    ("score", "", "reward"), ("grade_answers", "", "reward"), ("run", "evaluate", "evaluation"),
    ("rollout_phase", "lifecycle", "weight sync"), ("update_weights", "", "weight sync"),
    ("save", "", "checkpoint"), ("export", "", "checkpoint"), ("write_manifest", "", "checkpoint"),
    ("verify_manifest", "", "checkpoint"),
)
# Innermost frame's file -> code group (first match wins).
CODE = (
    ("pebr_mega/parallel/cpu_compat", "pebr: CPU compatibility layer (+ the ops it forwards)"),
    ("megatron/", "megatron-core (+ the ops it calls)"),
    ("transformers/generation", "transformers: generation loop"),
    ("transformers/cache_utils", "transformers: KV cache"),
    ("tokenization", "tokenizer"), ("processing", "image processor"), ("image_", "image processor"),
    ("transformers/", "transformers: model code (+ ops)"),
    ("torch/autograd", "torch autograd engine (backward kernels)"), ("torch/optim", "optimizer"),
    ("torch/", "torch Python (+ ops)"), ("PIL/", "PIL"), ("pebr_mega/kernels", "pebr kernels (reference path)"),
    ("pebr_mega/", "pebr Python (+ ops)"), ("threading.py", "waiting (locks, queues)"),
    ("<frozen importlib", "imports"),
)
TOY_ARGS = ("--num-grpo", "8", "--num-sft", "16", "--num-eval", "4", "--clip-steps", "4", "sft.epochs=1",
            "sft.batch_size=8", "sample.n=2", "rollout.n=2", "rollout.max_new_tokens=12", "grpo.rollout_batch_size=2",
            "grpo.mini_batch_size=2", "grpo.max_steps=1", "logging.progress_bar=false")
# Stage 1 trains on every GRPO question (the demo's `pipeline.stage1_data=grpo`), so it runs at toy sizes too;
# a toy model answers nothing right, so there are no medium questions and stage 2 is skipped with its reason.


def thread_count() -> int:
    """Threads of this process, native ones included (Python's `threading` sees only its own)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        pass
    return threading.active_count()


def classify(frames: Sequence[tuple[str, str]]) -> tuple[str, str, str]:
    """(stage, phase, code group) of one stack, given outermost-first as (function name, file name)."""
    stage = next((STAGES[f] for f, _ in frames if f in STAGES), "other")
    phase = "other"
    for func, path in frames:
        for name, fragment, label in PHASES:
            if func == name and fragment in path:
                phase = label
    leaf = frames[-1][1] if frames else ""
    code = next((label for fragment, label in CODE if fragment in leaf), "other")
    return stage, phase, code


class StackSampler:
    """Samples one thread's stack and the process's thread count every `interval` seconds, in a daemon thread."""

    def __init__(self, interval: float = 0.01, thread_id: int | None = None) -> None:
        self.interval = interval
        self.thread_id = thread_id if thread_id is not None else threading.main_thread().ident
        self.samples: list[tuple[str, str, str, int]] = []  # (stage, phase, code, threads)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="profile-sampler", daemon=True)

    def __enter__(self) -> "StackSampler":
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            stack = []
            while frame is not None:
                stack.append((frame.f_code.co_name, frame.f_code.co_filename.replace("\\", "/")))
                frame = frame.f_back
            self.samples.append((*classify(stack[::-1]), thread_count()))

    def report(self) -> dict:
        """Seconds per stage (with its phases and threads), per code group, scaled to the measured wall."""
        scale = self.seconds / max(len(self.samples), 1)
        stages: dict[str, dict] = {}
        code = collections.Counter()
        for stage, phase, group, threads in self.samples:
            s = stages.setdefault(stage, {"seconds": 0.0, "threads_start": threads, "threads_max": threads,
                                          "phases": collections.Counter()})
            s["seconds"] += scale
            s["threads_max"] = max(s["threads_max"], threads)
            s["phases"][phase] += scale
            code[group] += scale
        ordered = {k: stages[k] for k in STAGE_ORDER if k in stages}
        for s in ordered.values():
            s["seconds"] = round(s["seconds"], 2)
            s["phases"] = {k: round(v, 2) for k, v in s["phases"].most_common()}
        return {"interval_s": self.interval, "samples": len(self.samples), "seconds": round(self.seconds, 2),
                "stages": ordered, "code": {k: round(v, 2) for k, v in code.most_common()}}


def format_report(profile: dict) -> str:
    """A readable table of `profile.json`."""
    lines = [f"[profile] {profile['seconds']:.0f}s, {profile['samples']} samples every {profile['interval_s'] * 1e3:.0f} ms"]
    measured = profile.get("measured_seconds", {})
    for stage, s in profile["stages"].items():
        own = f" (pipeline: {measured[stage]:.0f}s)" if stage in measured else ""
        phases = ", ".join(f"{k} {v:.0f}s" for k, v in s["phases"].items() if v >= 0.5 or len(s["phases"]) == 1)
        lines.append(f"  {stage:7s} {s['seconds']:7.1f}s{own} | threads {s['threads_start']} -> max {s['threads_max']} | {phases}")
    total = max(profile["seconds"], 1e-9)
    lines.append("  innermost Python frame (C calls from it included):")
    lines += [f"    {100 * v / total:5.1f}%  {k}" for k, v in profile["code"].items() if v / total >= 0.005]
    env = profile.get("environment") or {}
    if env:
        lines.append("  on: " + ", ".join(f"{k} {v}" for k, v in env.items() if not isinstance(v, dict)))
    return "\n".join(lines)


def profile_demo(out: Path, demo_args: Sequence[str], interval: float = 0.01,
                 run: Callable[[list[str]], int] | None = None) -> tuple[int, dict]:
    """Run `pebr demo --out OUT *demo_args` under the sampler; returns (exit code, profile) and writes
    `OUT/profile.json`."""
    if run is None:
        from pebr_mega.cli import main as run
    with StackSampler(interval) as sampler:
        rc = run(["demo", "--out", str(out), *demo_args])
    profile = sampler.report()
    summary_file = out / "summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        profile["measured_seconds"] = {k: summary[k]["seconds"] for k in ("sft", "stage1", "stage2")
                                       if isinstance(summary.get(k), dict) and "seconds" in summary[k]}
        if isinstance(summary.get("sample"), dict) and "seconds" in summary["sample"]:
            profile["measured_seconds"]["sample"] = summary["sample"]["seconds"]
        if isinstance(summary.get("clip"), dict) and "seconds" in summary["clip"]:
            profile["measured_seconds"]["clip"] = summary["clip"]["seconds"]
        profile["environment"] = summary.get("environment", {})
        profile["demo_wall_seconds"] = summary.get("wall_seconds")
    (out / "profile.json").write_text(json.dumps(profile, indent=1) + "\n")
    return rc, profile


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the demo's output directory (profile.json is written there)")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--toy", action="store_true", help="CI's toy sizes (seconds, not the demo's figures)")
    parser.add_argument("--interval", type=float, default=0.01, help="seconds between samples")
    parser.add_argument("demo_args", nargs="*", help="more `pebr demo` arguments (after --)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    demo_args = ["--seed", args.seed, *(TOY_ARGS if args.toy else ()), *args.demo_args]
    rc, profile = profile_demo(out, demo_args, args.interval)
    print(format_report(profile))
    print(f"[profile] written to {out / 'profile.json'}")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
