"""`pebr demo`: the whole PeBR recipe on the embedded default, offline, on CPU.

Builds a tiny Qwen2.5-VL (tokenizer trained locally), renders the synthetic shapes set and a tiny CLIP, then
runs the recipe (SFT -> sampling -> split -> stage 1 -> stage 2 -> export) and an inference with the final
model. Writes `summary.json` and `curves.png` in the output directory and prints what each stage changed.

The tiny CLIP is random, so its alignment score carries no signal: the demo's stage-1 preset keeps the
keyword, format and length rewards and sets the CLIP weight to 0 (the CLIP scorer itself is exercised by
the tests). Everything else runs as in a real job.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from importlib import resources

from pebr_mega.errors import DataError


# The demo's SFT teacher is sloppy on reasoning questions (see `SynthConfig.sft_teacher_error`): the
# error stage 2's verifiable reward has to correct. docs/DEMO.md reports the demo with and without it.
DEMO_TEACHER_ERROR = 0.6
SYNTH_RECORD = "synth_config.json"  # the SynthConfig the demo's data were written with


def demo_config_path() -> Path:
    """The packaged `tiny_cpu.yaml`."""
    return Path(str(resources.files("pebr_mega") / "configs" / "tiny_cpu.yaml"))


def prepare_assets(out: Path, seed: int, num_grpo: int, num_sft: int, num_eval: int,
                   teacher_error: float = 0.0) -> dict[str, Path]:
    """Tiny model, synthetic data and tiny CLIP under `out` (reused when already there)."""
    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model
    from pebr_mega.rewards.tiny_clip import TinyClipConfig, build_tiny_clip

    model, data, clip = out / "model", out / "data", out / "clip"
    synth = SynthConfig(num=num_grpo, num_sft=num_sft, num_eval=num_eval, seed=seed, max_objects=4,
                        sft_teacher_error=teacher_error)
    check_reused_data(data, asdict(synth))
    if not (model / "config.json").is_file():
        build_tiny_model(model, TinyModelConfig(seed=seed), tokenizer_corpus())
    if not (data / "eval.json").is_file():
        write_synthetic_dataset(data, synth)
        (data / SYNTH_RECORD).write_text(json.dumps(asdict(synth), indent=1) + "\n")
    if not (clip / "config.json").is_file():
        build_tiny_clip(clip, tokenizer_corpus(), TinyClipConfig(image_size=112, patch_size=28, seed=seed))
    return {"model": model, "data": data, "clip": clip}


def check_reused_data(data: Path, wanted: dict) -> None:
    """Refuse to reuse a demo's data written with other settings (seed, sizes, teacher error)."""
    if not (data / "eval.json").is_file():
        return
    record = data / SYNTH_RECORD
    saved = json.loads(record.read_text()) if record.is_file() else None
    if saved != wanted:
        diff = ("no record of its settings" if saved is None else
                ", ".join(f"{k}={saved.get(k)!r} (asked {v!r})" for k, v in wanted.items() if saved.get(k) != v))
        raise DataError(f"{data} holds synthetic data written with other settings: {diff}; "
                         "choose another --out (or delete that directory)")


def run_demo(out_dir: str | Path, seed: int = 0, num_grpo: int = 512, num_sft: int = 1024, num_eval: int = 256,
             overrides: Sequence[str] = (), teacher_error: float = DEMO_TEACHER_ERROR) -> dict:
    """Run the demo into `out_dir`; returns the summary (also written to `out_dir/summary.json`)."""
    from pebr_mega.config import load_config
    from pebr_mega.logging import plot_metrics
    from pebr_mega.trainer.pipeline import run_pipeline

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[demo] building the tiny model, the synthetic data and a tiny CLIP in {out} (the SFT teacher gets "
          f"{teacher_error:.0%} of its reasoning answers wrong by one: docs/DEMO.md)")
    assets = prepare_assets(out, seed, num_grpo, num_sft, num_eval, teacher_error)
    data = assets["data"]
    cfg = load_config(demo_config_path(), [
        f"run.seed={seed}",
        f"pipeline.work_dir={out / 'pipeline'}",
        f"pipeline.base_model={assets['model']}",
        f"pipeline.sft_file={data / 'sft.json'}",
        f"pipeline.grpo_file={data / 'grpo.json'}",
        f"pipeline.eval_file={data / 'eval.json'}",
        f"rewards.clip_model_dir={assets['clip']}",
        "rewards.weights.clip=0.0",
        *overrides,
    ])
    results = run_pipeline(cfg)
    summary = summarize(results, time.time() - t0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    runs = [out / "pipeline" / s / "metrics.jsonl" for s in ("stage1", "stage2")]
    runs = [r for r in runs if r.is_file()]
    if runs:
        plot_metrics(runs, out / "curves.png", labels=[r.parent.name for r in runs])
    print_summary(summary, out)
    return summary


def _stage_summary(res: dict | None) -> dict:
    if not res:
        return {}
    after, before = res.get("eval_after") or {}, res.get("eval_before") or {}
    out = {
        "eval_accuracy": after.get("eval/accuracy"),
        "eval_accuracy_before": before.get("eval/accuracy"),
        "eval_format": after.get("eval/format"),
        "eval_reward": after.get("eval/reward"),
        "mean_reward": res.get("mean_reward"),
        "first_step_reward": res.get("first_reward"),
        "last_step_reward": res.get("last_reward"),
        "first_step_loss": res.get("first_loss"),
        "last_step_loss": res.get("last_loss"),
        "steps": res.get("steps"),
        "seconds": res.get("seconds"),
        "model_dir": res.get("model_dir"),
    }
    if res.get("skipped"):
        out["skipped"] = res["skipped"]
    return {k: v for k, v in out.items() if not (isinstance(v, float) and v != v)}  # drop NaN (n/a) entries


def summarize(results: dict, wall: float) -> dict:
    """`{"sft": {...}, "stage1": {...}, "stage2": {...}, "wall_seconds": ...}` from the pipeline's results."""
    sft = _stage_summary(results.get("sft"))
    # For SFT the "reward" is the held-out stage-2 preset reward (0.9 accuracy + 0.1 format).
    sft["mean_reward"] = sft.get("eval_reward")
    return {"sft": sft, "sample": results.get("sample", {}), "split": results.get("split", {}).get("counts", {}),
            "stage1": _stage_summary(results.get("stage1")), "stage2": _stage_summary(results.get("stage2")),
            "final_model": results.get("export", {}).get("model_dir"), "wall_seconds": round(wall, 1)}


def print_summary(summary: dict, out: Path) -> None:
    """What each stage changed, one line per stage."""
    def f(x):
        return "  n/a" if x is None else f"{x:.3f}"

    print("\n[demo] what each stage changed (held-out accuracy before -> after; mean training reward)")
    for stage in ("sft", "stage1", "stage2"):
        s = summary.get(stage) or {}
        if s.get("skipped"):
            print(f"  {stage:7s} skipped: {s['skipped']}")
            continue
        print(f"  {stage:7s} accuracy {f(s.get('eval_accuracy_before'))} -> {f(s.get('eval_accuracy'))} | "
              f"format {f(s.get('eval_format'))} | mean reward {f(s.get('mean_reward'))} | {s.get('seconds') or 0:.0f}s")
    print(f"  split: {summary.get('split')}")
    print(f"[demo] {summary['wall_seconds']:.0f}s in all; summary.json and curves.png in {out}; "
          f"final model {summary.get('final_model')}")
