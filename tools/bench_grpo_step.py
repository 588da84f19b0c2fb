#!/usr/bin/env python3
"""One GRPO step of a small random Qwen2.5-VL with the HF rollout engine: phase timings and tokens/s.

    python tools/bench_grpo_step.py                       # on a GPU: a ~100 M-parameter model, bf16
    python tools/bench_grpo_step.py --smoke               # any machine: the tiny model on CPU (code path only)
    python tools/bench_grpo_step.py --record docs/PERFORMANCE.md

Builds the model with `pebr tiny-model`'s maker at the requested sizes and the synthetic shapes data, runs
`GRPOTrainer` for `--steps` steps (the first one includes start-up costs and is reported separately), and
prints the per-phase seconds (rollout, reward, log-probs, update, sync), tokens/s and TFLOP/s of the last step.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("time/rollout", "time/reward", "time/logprobs", "time/update", "time/sync", "time/step")


def run(args: argparse.Namespace) -> dict:
    """Build the assets, run the steps, return the last step's metrics."""
    import torch

    from pebr_mega.config import load_config
    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset
    from pebr_mega.logging import read_metrics
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model
    from pebr_mega.trainer.grpo import GRPOTrainer

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench_grpo_step: no CUDA device; nothing measured (use --smoke to run the code path on CPU)")
        raise SystemExit(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_grpo_"))
    size = TinyModelConfig() if args.smoke else TinyModelConfig(hidden_size=1024, intermediate_size=2816,
                                                                num_layers=8, num_heads=16, num_kv_heads=4,
                                                                vision_depth=4, vision_hidden_size=512,
                                                                vision_intermediate_size=1024, vision_heads=8)
    model = build_tiny_model(work / "model", size, tokenizer_corpus())
    data = write_synthetic_dataset(work / "data", SynthConfig(num=args.prompts * args.steps, num_sft=1,
                                                              num_eval=1, seed=0)).out_dir
    cfg = load_config(None, [
        f"run.output_dir={work / 'run'}", "model.spec=torch",
        f"model.params_dtype={'bfloat16' if cuda else 'float32'}", "logging.progress_bar=false",
        "images.min_pixels=3136", "images.max_pixels=50176", "rewards.stage=stage2", "grpo.stage=stage2",
        f"grpo.init_model={model}", f"grpo.train_file={data / 'grpo.json'}", f"grpo.max_steps={args.steps}",
        f"grpo.rollout_batch_size={args.prompts}", f"grpo.mini_batch_size={args.prompts}", "grpo.save_every=0",
        f"rollout.n={args.n}", f"rollout.max_new_tokens={args.max_new_tokens}", "rollout.engine=hf",
        f"rollout.batch_size={args.prompts}", "data.eval_file="])
    GRPOTrainer(cfg).train()
    rows = read_metrics(work / "run" / "metrics.jsonl")
    last = rows[-1]
    last["_first_step_seconds"] = rows[0]["time/step"]
    return last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: exercises the code path only")
    p.add_argument("--work", default=None)
    p.add_argument("--record", default=None, help="markdown file to append the result to")
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.n, args.max_new_tokens, args.steps = min(args.prompts, 4), min(args.n, 2), 16, 1
    m = run(args)
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "CPU (smoke)"
    row = (f"| {dt.date.today()} | {card} | {args.prompts}x{args.n} | {args.max_new_tokens} | "
           + " | ".join(f"{m.get(k, float('nan')):.2f}" for k in PHASES)
           + f" | {m.get('tokens_per_s', float('nan')):.0f} | {m.get('tflops', float('nan')):.2f} |")
    header = ("| date | card | prompts x n | max new | rollout s | reward s | log-probs s | update s | sync s | "
              "step s | tokens/s | TFLOP/s |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(header + "\n" + row)
    print(json.dumps({k: m[k] for k in sorted(m) if k.startswith(("time/", "sync/", "mismatch"))}, indent=1))
    if args.record and not args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from perf_docs import add_table_row

        add_table_row(args.record, "## GRPO step", header, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
