"""`pebr demo` end to end at toy sizes: every stage runs (or is skipped with its reason) and the summary and
curves are written in the documented shape. The demo runs in its own process (started by conftest), as `pebr demo` does."""
from __future__ import annotations

import json

import pytest
import yaml

from pebr_mega.cli import main


def test_demo_writes_summary_and_curves(trainer_runs):
    out, got = trainer_runs["tmp"] / "demo" / "demo", trainer_runs["demo"]
    assert "error" not in got, got.get("error")
    assert got["rc"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= {"sft", "stage1", "stage2", "wall_seconds", "split", "final_model"}
    assert "eval_accuracy" in summary["sft"] and "mean_reward" in summary["sft"]
    assert 0.0 <= summary["sft"]["eval_description_exact"] <= 1.0
    for stage in ("stage1", "stage2"):
        s = summary[stage]
        assert "skipped" in s or ("eval_accuracy" in s and "mean_reward" in s and "eval_description_exact" in s), (stage, s)
    # The tiny CLIP was trained (on the 24 training images) and measured on the 4 held-out ones.
    clip = json.loads((out / "clip" / "training.json").read_text())
    assert clip["eval_images"] == 4 and clip["training"]["steps"] == 4
    assert summary["clip_retrieval_accuracy"] == clip["clip_retrieval_accuracy"]
    assert {"clip_reward_true", "clip_reward_negative"} <= set(summary["clip"])
    # The demo's teacher (both of its errors, docs/DEMO.md) is recorded with the data and in the summary, and
    # the CLIP is measured on descriptions that leave a group out, the teacher's perception error.
    from pebr_mega.recipe.demo import DEMO_DESCRIPTION_OMISSION, DEMO_TEACHER_ERROR, SYNTH_RECORD
    assert summary["teacher"] == {"reasoning_error": DEMO_TEACHER_ERROR, "description_omission": DEMO_DESCRIPTION_OMISSION}
    synth = json.loads((out / "data" / SYNTH_RECORD).read_text())
    assert (synth["sft_teacher_error"], synth["sft_description_omission"]) == (DEMO_TEACHER_ERROR, DEMO_DESCRIPTION_OMISSION)
    assert set(clip["omission"]) == {"images", "pairwise_accuracy", "reward_true", "reward_omitted"}
    assert set(clip["extra"]) == {"images", "pairwise_accuracy", "reward_true", "reward_extra"}
    # The colour-and-count world (shapes drawn, never named), and a CLIP whose hard negatives are its errors.
    assert synth["describe_shapes"] is False and synth["distinct_colors"] is True
    assert clip["negative_kinds"] == ["count", "color", "omit", "extra"]
    assert summary["sft"]["eval_description_shape_accuracy"] is None  # no shape named, none scored
    # Stage 1 trained on every GRPO question (the demo's departure from the easy split).
    stage1 = yaml.safe_load((out / "pipeline" / "stage1" / "config.yaml").read_text())
    assert stage1["grpo"]["train_file"].endswith("grpo.json") and stage1["pipeline"]["stage1_data"] == "grpo"
    # Stage 1 runs with the recipe's weights: the demo overrides none of them (the CLIP reward is on).
    assert yaml.safe_load((out / "pipeline" / "sft" / "config.yaml").read_text())["rewards"]["weights"] == {}
    held = [json.loads(x) for x in (out / "heldout.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in held] == ["sft", "stage1", "stage2"]
    assert held[0]["eval/description_exact"] == summary["sft"]["eval_description_exact"]
    assert sum(summary["split"][k] for k in ("easy", "medium", "hard")) == 8
    assert (out / "pipeline" / "final" / "config.json").is_file()
    printed = got["printed"]
    assert "what each stage changed" in printed and "ground truth:" in printed
    if any("skipped" not in summary[s] for s in ("stage1", "stage2")):
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_refuses_to_reuse_data_written_with_other_settings(tmp_path, capsys):
    from pebr_mega.recipe.demo import SYNTH_RECORD, check_reused_data

    data = tmp_path / "data"
    data.mkdir()
    check_reused_data(data, {"seed": 0})  # nothing there yet: fine
    (data / "eval.json").write_text("[]")
    (data / SYNTH_RECORD).write_text(json.dumps({"seed": 0, "sft_teacher_error": 0.6}))
    check_reused_data(data, {"seed": 0, "sft_teacher_error": 0.6})  # same settings: reused
    rc = main(["demo", "--out", str(tmp_path), "--teacher-error", "0", "--seed", "0"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "sft_teacher_error=0.6 (asked 0.0)" in err and str(data) in err and "choose another --out" in err
    (data / SYNTH_RECORD).write_text(json.dumps({"seed": 0, "sft_description_omission": 0.7}))
    rc = main(["demo", "--out", str(tmp_path), "--description-omission", "0.3", "--seed", "0"])
    assert rc == 2
    assert "sft_description_omission=0.7 (asked 0.3)" in capsys.readouterr().err


def test_demo_profile_has_every_stage_and_no_thread_growth(trainer_runs):
    """tools/profile_demo.py (the toy demo above ran under it) files the run by stage and phase, and no stage
    holds more threads than the most an earlier stage held: the stages share one set of process groups and
    shut their pools down (rebuilding Megatron's groups per stage added ~50 gloo threads each time)."""
    out = trainer_runs["tmp"] / "demo" / "demo"
    profile = json.loads((out / "profile.json").read_text())
    stages = profile["stages"]
    assert {"clip", "sft", "sample", "stage1"} <= set(stages), stages.keys()
    assert stages["sft"]["phases"].get("update", 0) > 0 and stages["stage1"]["phases"].get("generate", 0) > 0
    assert sum(profile["code"].values()) == pytest.approx(profile["seconds"], rel=0.05)
    assert profile["environment"]["torch_threads"] >= 1 and profile["environment"]["torch"]
    ran = [s for s in ("sft", "sample", "split", "stage1", "stage2", "export") if s in stages]
    most = stages[ran[0]]["threads_max"]
    for stage in ran[1:]:
        assert stages[stage]["threads_max"] <= most, (stage, {k: stages[k]["threads_max"] for k in ran})
    assert "[profile]" in trainer_runs["demo"]["printed"]


def test_demo_summary_has_paired_sign_tests_between_stages(trainer_runs):
    """Each stage's final evaluation is kept per question (`eval_after.jsonl`), and the summary compares the
    stages on the same questions: gained and lost questions, whose difference is the change of the mean."""
    out = trainer_runs["tmp"] / "demo" / "demo"
    summary = json.loads((out / "summary.json").read_text())
    test = summary["paired"]["stage1_vs_sft"]
    assert set(test) == {"accuracy", "description_exact", "description_count_color_exact", "description_omission",
                         "description_extra"}
    for metric, t in test.items():
        assert t["n"] == 4 and summary["stage1"][f"eval_{metric}"] == pytest.approx(t["after"])
        assert summary["sft"][f"eval_{metric}"] == pytest.approx(t["before"])
        assert (t["gained"] - t["lost"]) / t["n"] == pytest.approx(t["after"] - t["before"])
    rows = [json.loads(x) for x in (out / "pipeline" / "stage1" / "eval_after.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {"qid", "accuracy", "description_exact", "description_omission",
                               "description_extra"} <= set(rows[0])


def test_sign_test_counts_and_z():
    from pebr_mega.recipe.demo import sign_test

    before = [1, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    after = [1, 1, 1, 1, 0, 1, 1, 1, 0, 0]
    t = sign_test(before, after)
    assert (t["gained"], t["lost"], t["n"]) == (5, 1, 10)
    assert t["z"] == pytest.approx(round(4 / 6 ** 0.5, 2))  # (5 - 1) / sqrt(6) = 1.63
    assert sign_test([1, 0], [1, 0])["z"] == 0.0


def _ablation_worker(rank, out):
    """`run_ablation` on a copy of the toy demo whose medium split holds the easy questions (the toy model's
    split has none), against the recipe's stage 1 file standing in for its stage 2."""
    from pathlib import Path

    from pebr_mega.recipe.demo import run_ablation, demo_config

    out = Path(out)
    cfg = demo_config(out, 0, ["rollout.n=2", "rollout.max_new_tokens=12", "grpo.rollout_batch_size=2",
                               "grpo.mini_batch_size=2", "grpo.max_steps=1", "logging.progress_bar=false",
                               "rewards.num_workers=1"])
    results = {"sft": {"model_dir": str(out / "pipeline" / "sft" / "hf")}, "stage2": {}}
    return run_ablation(cfg, out, results)


def test_demo_ablation_runs_stage2_from_sft_and_pairs_it_with_the_recipe(trainer_runs, tmp_path):
    import shutil

    from pebr_mega.parallel.launch import spawn
    from pebr_mega.recipe.demo import ABLATION_DIR, run_ablation

    src = trainer_runs["tmp"] / "demo" / "demo"
    skipped = run_ablation(None, src, {"sft": {"model_dir": "m"}, "stage2": {"skipped": "0 questions"}})
    assert skipped == {"skipped": "the recipe's stage 2 was skipped (0 questions)"}
    out = tmp_path / "demo"
    shutil.copytree(src, out, symlinks=True)
    split = out / "pipeline" / "split"
    # The toy model answers nothing right (every question hard, stage 2 skipped): give stage 2 the GRPO questions.
    shutil.copy(out / "data" / "grpo.json", split / "mediumcase.json")
    (out / "pipeline" / "stage2").mkdir(exist_ok=True)
    shutil.copy(out / "pipeline" / "stage1" / "eval_after.jsonl", out / "pipeline" / "stage2" / "eval_after.jsonl")
    got = spawn(_ablation_worker, 1, str(out), megatron_only=False)[0]
    assert got["stage2_from_sft"]["steps"] == 1 and "eval_accuracy" in got["stage2_from_sft"]
    assert got["stage2_from_sft"]["seconds"] > 0
    paired = got["paired"]["stage2_vs_stage2_from_sft"]
    assert paired["accuracy"]["n"] == 4 and set(paired) >= {"accuracy", "description_exact"}
    assert (out / ABLATION_DIR / "eval_after.jsonl").is_file()
