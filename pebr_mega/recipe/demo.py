"""`pebr demo`: the whole PeBR recipe on the embedded default, offline, on CPU.

Builds a tiny Qwen2.5-VL (tokenizer trained locally), renders the synthetic set (colours and counts named,
shapes drawn), and builds a tiny CLIP that it trains contrastively on the training splits' images and
descriptions, with hard negatives that differ by one count, one colour, a group left out or a group that is
not there (`rewards.clip_training`), so that stage 1's CLIP reward tells a
right description from a wrong one. Then it runs the recipe (SFT -> sampling -> split -> stage 1 -> stage 2
-> export) with the recipe's reward weights and an inference with the final model. Writes `summary.json`
and `curves.png` in the output directory and prints what each stage changed: held-out answer accuracy and
the fraction of held-out descriptions that state every group of the scene exactly.
"""
from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from pebr_mega.config import PebrConfig, load_config
from pebr_mega.data.corpus import tokenizer_corpus
from pebr_mega.data.images import load_image
from pebr_mega.data.synthetic import (EXTRA_KIND, OMIT_KIND, SynthConfig, describe_scene, hard_negative_kinds,
                                      hard_negatives, load_scenes, write_synthetic_dataset)
from pebr_mega.errors import DataError
from pebr_mega.logging import read_metrics
from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model
from pebr_mega.parallel.threads import machine_record
from pebr_mega.rewards.clip import ClipAlignmentScorer
from pebr_mega.rewards.clip_training import ClipPair, ClipTrainingConfig, retrieval_metrics, train_clip
from pebr_mega.rewards.model import RewardConfig
from pebr_mega.rewards.tiny_clip import TinyClipConfig, build_tiny_clip
from pebr_mega.recipe.pipeline import known_evaluation, run_pipeline
from pebr_mega.recipe.work_dir import grpo_stage_config, grpo_train_file
from pebr_mega.run.run_dir import EVAL_RESULTS_FILE
from pebr_mega.trainer.grpo import GRPOTrainer
from pebr_mega.trainer.stage import eval_set_of
from pebr_mega.versions import REPORTED, installed_version

# The demo's SFT teacher has two habits, one per GRPO stage to correct. It is sloppy on reasoning questions
# (`SynthConfig.sft_teacher_error`): stage 2's verifiable reward has to correct that. And it overlooks the last
# group of half of its scenes (`SynthConfig.sft_description_omission`): its description leaves the group out,
# and so does its counting ("How many objects", "Remove all ..."), an error for stage 1's perception rewards
# whose fix reaches the answers. The world names colours and counts, not shapes (`SynthConfig.describe_shapes`:
# the tiny model never learnt to name shapes, docs/DEMO.md); `--describe-shapes` draws the other world. Each
# object has its own colour (`SynthConfig.distinct_colors`: the tiny model never learnt to count two objects of
# one colour, docs/DEMO.md); `--repeated-colors` lets colours repeat.
DEMO_TEACHER_ERROR = 0.6
DEMO_DESCRIPTION_OMISSION = 0.5
DEMO_DESCRIBE_SHAPES = False
DEMO_DISTINCT_COLORS = True
SYNTH_RECORD = "synth_config.json"  # the SynthConfig the demo's data were written with
CLIP_RECORD = "training.json"  # the trained tiny CLIP's settings and held-out retrieval metrics
CLIP_TRAIN_SPLITS = ("sft", "grpo")  # the CLIP never sees the held-out images
CLIP_NEGATIVE_POOL = 8  # hard negatives per training image (each step draws from them)
CLIP_EVAL_NEGATIVES = 4  # hard negatives per held-out image for the retrieval metrics


def demo_clip_config(seed: int) -> TinyClipConfig:
    """The demo's tiny CLIP: 112 px images in 28 px patches (one patch per cell of the scenes' grid)."""
    return TinyClipConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, projection_dim=64,
                          image_size=112, patch_size=28, seed=seed)


def demo_config_path() -> Path:
    """The packaged `tiny_cpu.yaml`."""
    return Path(str(resources.files("pebr_mega") / "configs" / "tiny_cpu.yaml"))


def prepare_assets(out: Path, seed: int, num_grpo: int, num_sft: int, num_eval: int,
                   teacher_error: float = 0.0, rewards: Any = None, clip_steps: int | None = None,
                   description_omission: float = 0.0, describe_shapes: bool = False,
                   distinct_colors: bool = False) -> dict[str, Any]:
    """Tiny model, synthetic data and the trained tiny CLIP under `out` (each reused when already there).

    `rewards` (a `RewardConfig`) gives the CLIP scorer's image size, text length and threshold, which the
    CLIP's training uses too; the returned dict holds the paths and the CLIP's record (`clip_record`).
    """
    model, data, clip = out / "model", out / "data", out / "clip"
    synth = SynthConfig(num=num_grpo, num_sft=num_sft, num_eval=num_eval, seed=seed, max_objects=4,
                        sft_teacher_error=teacher_error, sft_description_omission=description_omission,
                        describe_shapes=describe_shapes, distinct_colors=distinct_colors)
    check_reused_data(data, asdict(synth))
    if not (model / "config.json").is_file():
        build_tiny_model(model, TinyModelConfig(seed=seed), tokenizer_corpus())
    if not (data / "eval.json").is_file():
        write_synthetic_dataset(data, synth)
        (data / SYNTH_RECORD).write_text(json.dumps(asdict(synth), indent=1) + "\n")
    # The CLIP's hard negatives are the errors the model makes: a count, a colour (a shape, where named), a whole
    # group left out, and a group that is not there. Without omissions among them the CLIP scored an undercount
    # above an overcount and stage 1 drifted toward leaving groups out; without extra groups stage 1, taught not
    # to omit, overcorrected by naming groups that are not there (docs/DEMO.md).
    kinds = (*hard_negative_kinds(synth.describe_shapes), OMIT_KIND, EXTRA_KIND)
    record = prepare_clip(clip, data, seed, rewards or RewardConfig(), clip_steps, kinds, synth.describe_shapes)
    return {"model": model, "data": data, "clip": clip, "clip_record": record}


def clip_pairs(data: Path, splits: Sequence[str], negatives: int, seed: int,
               kinds: Sequence[str] | None = None, shapes: bool = False) -> list:
    """(image, true description, hard negatives) for every image of `splits`, negatives drawn from `seed` (of
    the perception-error `kinds`, default the world's `hard_negative_kinds`; `shapes`: the world names shapes);
    images without any are left out."""
    kinds = tuple(kinds or hard_negative_kinds(shapes))
    tag = "" if kinds == hard_negative_kinds(True) else "/" + "+".join(kinds)
    pairs = []
    for split in splits:
        rng = random.Random(f"pebr-demo/{seed}/clip-negatives/{split}{tag}")
        for path, scene in sorted(load_scenes(data, split).items()):
            wrong = hard_negatives(scene, rng, negatives, kinds, shapes)
            if wrong:
                pairs.append(ClipPair(load_image(data / path), describe_scene(scene, shapes), wrong))
    return pairs


def single_error_metrics(scorer: Any, data: Path, seed: int, kind: str, reward_key: str, rewards: Any,
                         shapes: bool = False) -> dict:
    """The CLIP's held-out measurements against hard negatives of one perception-error `kind` alone: images,
    pairwise accuracy, mean reward of the true descriptions and (under `reward_key`) of the negatives."""
    pairs = clip_pairs(data, ("eval",), CLIP_EVAL_NEGATIVES, seed, kinds=(kind,), shapes=shapes)
    m = retrieval_metrics(scorer, pairs, rewards.clip_threshold)
    return {"images": len(pairs), "pairwise_accuracy": round(m["clip_pairwise_accuracy"], 4),
            "reward_true": round(m["clip_reward_true"], 4), reward_key: round(m["clip_reward_negative"], 4)}


def prepare_clip(clip: Path, data: Path, seed: int, rewards: Any, steps: int | None = None,
                 kinds: Sequence[str] | None = None, shapes: bool = False) -> dict:
    """Build the tiny CLIP, train it on the training splits (`rewards.clip_training`; hard negatives of the
    perception-error `kinds`, default the world's `hard_negative_kinds`; `shapes`: the world names shapes) and
    measure it on the held-out images against the world's hard negatives and, apart, against descriptions
    missing a group; returns (and writes to `clip/training.json`) the measurements. Reused when recorded with
    the same settings."""
    kinds = tuple(kinds or hard_negative_kinds(shapes))
    model_cfg = demo_clip_config(seed)
    train_cfg = ClipTrainingConfig(seed=seed, threshold=rewards.clip_threshold)
    if steps is not None:
        train_cfg.steps = steps
    record = clip / CLIP_RECORD
    if record.is_file() and (clip / "config.json").is_file():
        saved = json.loads(record.read_text())
        recorded_kinds = saved.get("negative_kinds", list(hard_negative_kinds(True)))
        if (saved.get("model"), saved.get("training"), recorded_kinds) != (asdict(model_cfg), asdict(train_cfg),
                                                                           list(kinds)):
            raise DataError(f"{clip} holds a CLIP trained with other settings ({record}); "
                            "choose another --out (or delete that directory)")
        return saved
    t0, c0 = time.perf_counter(), time.process_time()
    build_tiny_clip(clip, tokenizer_corpus(), model_cfg)
    pairs = clip_pairs(data, CLIP_TRAIN_SPLITS, CLIP_NEGATIVE_POOL, seed, kinds, shapes)
    stats = train_clip(clip, pairs, train_cfg, rewards.clip_image_size, rewards.clip_max_text_tokens,
                       log=lambda line: print(line, flush=True))
    scorer = ClipAlignmentScorer(clip, "cpu", rewards.clip_image_size, rewards.clip_max_text_tokens)
    held_out = clip_pairs(data, ("eval",), CLIP_EVAL_NEGATIVES, seed, shapes=shapes)
    measured = retrieval_metrics(scorer, held_out, rewards.clip_threshold)
    result = {**{k: round(v, 4) for k, v in measured.items()}, "eval_images": len(held_out),
              "eval_negatives_per_image": CLIP_EVAL_NEGATIVES, "negative_kinds": list(kinds),
              # Each group error alone, as the demo's model makes it: what the teacher's omissions (scenes of two
              # groups or more) and stage 1's extra groups look like to the CLIP reward.
              "omission": single_error_metrics(scorer, data, seed, OMIT_KIND, "reward_omitted", rewards, shapes),
              "extra": single_error_metrics(scorer, data, seed, EXTRA_KIND, "reward_extra", rewards, shapes),
              "train_final": {k: round(v, 4) for k, v in stats.items()},
              "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1),
              "model": asdict(model_cfg), "training": asdict(train_cfg)}
    record.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[demo] tiny CLIP trained in {result['seconds']:.0f}s: held-out retrieval "
          f"{result['clip_retrieval_accuracy']:.3f} (true description above all {CLIP_EVAL_NEGATIVES} hard negatives), "
          f"reward of true {result['clip_reward_true']:.2f} vs hard negatives {result['clip_reward_negative']:.2f}, "
          f"vs descriptions missing a group {result['omission']['reward_omitted']:.2f}, "
          f"vs descriptions with a group that is not there {result['extra']['reward_extra']:.2f}")
    return result


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


def demo_config(out: Path, seed: int, overrides: Sequence[str] = ()) -> PebrConfig:
    """The demo's pipeline config for the output directory `out` (`tiny_cpu.yaml` with the paths filled in)."""
    data = out / "data"
    return load_config(demo_config_path(), [
        f"run.seed={seed}",
        f"pipeline.work_dir={out / 'pipeline'}",
        f"pipeline.base_model={out / 'model'}",
        f"pipeline.sft_file={data / 'sft.json'}",
        f"pipeline.grpo_file={data / 'grpo.json'}",
        f"pipeline.eval_file={data / 'eval.json'}",
        f"rewards.clip_model_dir={out / 'clip'}",
        "sft.eval_before=false",  # the base model is random (accuracy 0): nothing to measure before SFT
        # Stage 1 on every GRPO question, not the easy split alone: at this scale the easy split is a few dozen
        # questions on the images the SFT model already describes best (docs/DEMO.md, "Where the demo departs").
        "pipeline.stage1_data=grpo",
        # 8 steps of 32 prompts, half an epoch: stage 1's reward does not look at the answer, and over 16 steps the
        # policy's reasoning drifted (held-out accuracy -10 points at seed 0) while its descriptions improved.
        "pipeline.stage1_max_steps=8",
        *overrides,
    ])


def run_demo(out_dir: str | Path, seed: int = 0, num_grpo: int = 512, num_sft: int = 1024, num_eval: int = 256,
             overrides: Sequence[str] = (), teacher_error: float = DEMO_TEACHER_ERROR,
             clip_steps: int | None = None, description_omission: float = DEMO_DESCRIPTION_OMISSION,
             ablation: bool = False, describe_shapes: bool = DEMO_DESCRIBE_SHAPES,
             distinct_colors: bool = DEMO_DISTINCT_COLORS) -> dict:
    """Run the demo into `out_dir`; returns the summary (also written to `out_dir/summary.json`). `ablation`
    also runs stage 2 from the SFT model directly (`run_ablation`) and reports it beside the recipe's."""
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, seed, overrides)
    print(f"[demo] building the tiny model, the synthetic data and a tiny CLIP in {out} (the SFT teacher gets "
          f"{teacher_error:.0%} of its reasoning answers wrong by one and leaves the last group out of "
          f"{description_omission:.0%} of its descriptions: docs/DEMO.md)")
    assets = prepare_assets(out, seed, num_grpo, num_sft, num_eval, teacher_error, cfg.rewards, clip_steps,
                            description_omission, describe_shapes, distinct_colors)
    results = run_pipeline(cfg)
    summary = summarize(results, time.time() - t0, assets["clip_record"],
                        {"reasoning_error": teacher_error, "description_omission": description_omission})
    summary["paired"] = paired_comparisons(out / "pipeline")
    if ablation:
        summary["ablation"] = run_ablation(cfg, out, results)
        summary["wall_seconds"] = round(time.time() - t0, 1)
    summary["environment"] = environment()
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_demo(out, summary)
    print_summary(summary, out)
    return summary


ABLATION_DIR = "ablation_stage2_from_sft"  # under the demo's output directory, beside pipeline/


def run_ablation(cfg: PebrConfig, out: Path, results: dict) -> dict:
    """The paper's comparison: stage 2 run from the SFT model directly (no stage 1) on the same medium
    questions, steps, seed and held-out set as the recipe's stage 2, in `out/ABLATION_DIR`; returns its stage
    summary and the paired tests of the recipe's stage 2 against it (`stage2_vs_stage2_from_sft`), or the
    reason it did not run. Reused when it already ran."""
    work = out / "pipeline"
    run_dir = out / ABLATION_DIR
    sft = (results.get("sft") or {}).get("model_dir")
    if not sft or (results.get("stage2") or {}).get("skipped"):
        why = "no SFT model" if not sft else f"the recipe's stage 2 was skipped ({results['stage2']['skipped']})"
        print(f"[demo] ablation: {why}; not run")
        return {"skipped": why}
    c = grpo_stage_config(cfg, work, "stage2", grpo_train_file(cfg, work, "stage2"), sft)
    c.run.output_dir = str(run_dir)
    if (run_dir / "result.json").is_file():
        res = json.loads((run_dir / "result.json").read_text())
    else:
        print(f"[demo] ablation: stage 2 from the SFT model directly, in {run_dir}")
        t0 = time.time()
        res = GRPOTrainer(c, eval_before=known_evaluation(results, sft, eval_set_of(c, c.grpo))).train().to_dict()
        res["seconds"] = round(time.time() - t0, 1)  # recorded as the pipeline records a stage's
        (run_dir / "result.json").write_text(json.dumps(res, indent=2) + "\n")
    paired = {}
    mine, recipe = run_dir / EVAL_RESULTS_FILE, work / "stage2" / EVAL_RESULTS_FILE
    if mine.is_file() and recipe.is_file():
        paired["stage2_vs_stage2_from_sft"] = paired_files(mine, recipe)
    return {"stage2_from_sft": _stage_summary(res), "paired": paired}


PAIRS = (("stage1", "sft"), ("stage2", "stage1"), ("stage2", "sft"))  # (later, earlier) stage
# z > 0: the later stage has more of it (for omissions and extra groups, more is worse)
PAIRED_METRICS = ("accuracy", "description_exact", "description_count_color_exact", "description_omission",
                  "description_extra")


def sign_test(before: Sequence[float], after: Sequence[float]) -> dict:
    """Paired comparison of per-question 0/1 results: questions gained and lost, and the sign test's z,
    (gained - lost) / sqrt(gained + lost) (0 when nothing changed); |z| > 2 is a change beyond chance at ~5%."""
    gained = sum(1 for b, a in zip(before, after) if a > b)
    lost = sum(1 for b, a in zip(before, after) if a < b)
    z = (gained - lost) / (gained + lost) ** 0.5 if gained + lost else 0.0
    return {"n": len(before), "before": sum(before) / max(len(before), 1), "after": sum(after) / max(len(after), 1),
            "gained": gained, "lost": lost, "z": round(z, 2)}


def paired_files(earlier: Path, later: Path) -> dict:
    """Sign tests of `later`'s per-question results against `earlier`'s (two `eval_after.jsonl`), on the
    questions both answered: `{"accuracy": sign_test(...), "description_exact": ..., ...}`."""
    before, after = ({r["qid"]: r for r in map(json.loads, p.read_text().splitlines())} for p in (earlier, later))
    qids = [q for q in before if q in after]
    return {m: sign_test([float(before[q][m]) for q in qids], [float(after[q][m]) for q in qids])
            for m in PAIRED_METRICS if all(m in rows[q] for rows in (before, after) for q in qids)}


def paired_comparisons(pipeline: Path) -> dict:
    """Sign tests between the stages' final held-out evaluations (each stage's `eval_after.jsonl`):
    `{"stage1_vs_sft": {"accuracy": sign_test(...), "description_exact": ...}, ...}`."""
    files = {stage: pipeline / stage / EVAL_RESULTS_FILE for stage in ("sft", "stage1", "stage2")}
    return {f"{later}_vs_{earlier}": paired_files(files[earlier], files[later]) for later, earlier in PAIRS
            if files[earlier].is_file() and files[later].is_file()}


def environment() -> dict:
    """What the demo's figures and wall time depend on besides the seed: versions, CPU, threads."""
    return {"python": platform.python_version(), **{n: installed_version(n) for n in REPORTED}, **machine_record()}


def _stage_summary(res: dict | None) -> dict:
    if not res:
        return {}
    after, before = res.get("eval_after") or {}, res.get("eval_before") or {}
    out = {
        "eval_accuracy": after.get("eval/accuracy"),
        "eval_accuracy_before": before.get("eval/accuracy"),
        "eval_description_exact": after.get("eval/description_exact"),
        "eval_description_exact_before": before.get("eval/description_exact"),
        "eval_description_f1": after.get("eval/description_f1"),
        "eval_description_count_color_exact": after.get("eval/description_count_color_exact"),
        "eval_description_omission": after.get("eval/description_omission"),
        "eval_description_extra": after.get("eval/description_extra"),
        "eval_description_shape_accuracy": after.get("eval/description_shape_accuracy"),
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


def summarize(results: dict, wall: float, clip: dict | None = None, teacher: dict | None = None) -> dict:
    """`{"sft": {...}, "stage1": {...}, "stage2": {...}, "wall_seconds": ..., "clip_retrieval_accuracy": ...}`
    from the pipeline's results and the trained CLIP's record; `teacher` (the SFT teacher's error rates) is
    recorded as given."""
    sft = _stage_summary(results.get("sft"))
    # For SFT the "reward" is the held-out stage-2 preset reward (0.9 accuracy + 0.1 format).
    sft["mean_reward"] = sft.get("eval_reward")
    clip = clip or {}
    return {"sft": sft, "sample": results.get("sample", {}), "split": results.get("split", {}).get("counts", {}),
            "stage1": _stage_summary(results.get("stage1")), "stage2": _stage_summary(results.get("stage2")),
            "clip_retrieval_accuracy": clip.get("clip_retrieval_accuracy"),
            "clip": {k: v for k, v in clip.items() if k not in ("model", "training")},
            "teacher": dict(teacher or {}),
            "final_model": results.get("export", {}).get("model_dir"), "wall_seconds": round(wall, 1)}


HELD_OUT = "heldout.jsonl"  # the held-out metrics after SFT, stage 1 and stage 2
TRAIN_KEYS = ("reward/total", "reward/clip", "reward/keyword", "reward/accuracy", "response_length/mean", "kl",
              "entropy", "grad_norm")
HELD_OUT_KEYS = ("eval/accuracy", "eval/description_exact", "eval/description_f1")


def plot_demo(out: Path, summary: dict) -> Path | None:
    """`curves.png`: the GRPO stages' training curves per step (one colour per stage), then the held-out
    accuracy and exact-description rate after SFT, stage 1 and stage 2 (also written to `heldout.jsonl`)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = ("sft", "stage1", "stage2")
    held = [{"stage": st, **{k: (summary.get(st) or {}).get("eval_" + k.split("/")[1]) for k in HELD_OUT_KEYS}}
            for st in stages]
    (out / HELD_OUT).write_text("".join(json.dumps(r) + "\n" for r in held))
    runs = {st: read_metrics(out / "pipeline" / st / "metrics.jsonl") for st in ("stage1", "stage2")
            if (out / "pipeline" / st / "metrics.jsonl").is_file()}
    if not runs:
        return None
    keys = [k for k in TRAIN_KEYS if any(k in r for rows in runs.values() for r in rows)]
    panels = keys + list(HELD_OUT_KEYS)
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(13.5, 3.2 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    colors = {"stage1": "tab:blue", "stage2": "tab:orange"}
    for ax, key in zip(axes.flat, panels):
        if key in HELD_OUT_KEYS:
            pts = [(i, r[key]) for i, r in enumerate(held) if r[key] is not None]
            ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", color="tab:green")
            for i, v in pts:
                ax.annotate(f"{v:.3f}", (i, v), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=8)
            ax.set_xticks(range(len(stages)), ["after SFT", "after stage 1", "after stage 2"])
            ax.set_title(f"held-out {key.split('/')[1]} (greedy)")
        else:
            for st, rows in runs.items():
                pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker=".", color=colors[st], label=st)
            ax.set_title(key)
            ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    png = out / "curves.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def print_summary(summary: dict, out: Path) -> None:
    """What each stage changed, one line per stage."""
    def f(x):
        return "  n/a" if x is None else f"{x:.3f}"

    clip = summary.get("clip") or {}
    if clip:
        print(f"\n[demo] tiny CLIP: held-out retrieval {f(clip.get('clip_retrieval_accuracy'))} | CLIP reward of "
              f"true descriptions {f(clip.get('clip_reward_true'))}, "
              f"of hard negatives {f(clip.get('clip_reward_negative'))}")
    print("\n[demo] what each stage changed (held-out accuracy and exact descriptions before -> after; "
          "mean training reward)")
    # Where descriptions name no shape, counts-and-colours exactness is exactness itself: printed once.
    shapes_named = any((summary.get(s) or {}).get("eval_description_shape_accuracy") is not None
                       for s in ("sft", "stage1", "stage2"))
    for stage in ("sft", "stage1", "stage2"):
        s = summary.get(stage) or {}
        if s.get("skipped"):
            print(f"  {stage:7s} skipped: {s['skipped']}")
            continue
        print(f"  {stage:7s} accuracy {f(s.get('eval_accuracy_before'))} -> {f(s.get('eval_accuracy'))} | "
              f"exact description {f(s.get('eval_description_exact_before'))} -> {f(s.get('eval_description_exact'))} "
              + (f"(counts+colours {f(s.get('eval_description_count_color_exact'))}, " if shapes_named else "(")
              + f"omissions {f(s.get('eval_description_omission'))}, "
              f"extra groups {f(s.get('eval_description_extra'))}) | "
              f"format {f(s.get('eval_format'))} | mean reward {f(s.get('mean_reward'))} | "
              f"{s.get('seconds') or 0:.0f}s")
    print(f"  split: {summary.get('split')}")
    ablation = summary.get("ablation") or {}
    if ablation.get("stage2_from_sft"):
        a = ablation["stage2_from_sft"]
        print(f"  ablation: stage 2 from SFT directly: accuracy {f(a.get('eval_accuracy_before'))} -> "
              f"{f(a.get('eval_accuracy'))} | exact description {f(a.get('eval_description_exact'))} | "
              f"{a.get('seconds') or 0:.0f}s (the recipe's stage 2, after stage 1: "
              f"{f((summary.get('stage2') or {}).get('eval_accuracy'))})")
    for pair, tests in {**(summary.get("paired") or {}), **ablation.get("paired", {})}.items():
        print(f"  {pair.replace('_vs_', ' vs '):16s} " + " | ".join(
            f"{m.replace('_', ' ')} +{t['gained']} -{t['lost']} (z {t['z']:+.1f})" for m, t in tests.items()
            if shapes_named or m != "description_count_color_exact"))
    env = summary.get("environment") or {}
    if env:
        print("[demo] on " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"[demo] {summary['wall_seconds']:.0f}s in all; summary.json and curves.png in {out}; "
          f"final model {summary.get('final_model')}")
