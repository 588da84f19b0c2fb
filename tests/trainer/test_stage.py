"""The stage loop's evaluation before training: measured, skipped (`eval_before: false`), or taken from the
pipeline's previous stage when that stage evaluated the same model on the same set greedily."""
from __future__ import annotations

from pathlib import Path

from pebr_mega.config import load_config
from pebr_mega.logging import LoggingConfig, MetricsLogger
from pebr_mega.recipe.pipeline import known_evaluation
from pebr_mega.trainer.stage import StageTrainer, eval_set_of


class RecordingEvaluator:
    """An evaluator that returns fixed metrics and counts its runs (the stage loop only calls `run`)."""

    def __init__(self, metrics: dict) -> None:
        self.metrics, self.runs = metrics, 0

    def run(self, results_path=None) -> dict:
        self.runs += 1
        self.results_path = results_path
        return dict(self.metrics)


def _stage(tmp_path: Path, known: dict | None, eval_before: bool = True) -> StageTrainer:
    # The loop's evaluation logic alone: no model, engine or process group is built.
    st = object.__new__(StageTrainer)
    cfg = load_config(None, [f"sft.eval_before={str(eval_before).lower()}"])
    st.cfg, st.loop, st.resumed, st.known_eval_before = cfg, cfg.sft, {}, known
    st.evaluator = RecordingEvaluator({"eval/accuracy": 0.25, "eval/count": 8.0})
    return st


def test_evaluate_before_measures_skips_or_reuses(tmp_path):
    logger = MetricsLogger(LoggingConfig(progress_bar=False), tmp_path / "run")
    measured = _stage(tmp_path, None)
    assert measured.evaluate_before(logger) == {"eval/accuracy": 0.25, "eval/count": 8.0}
    assert measured.evaluator.runs == 1 and measured.resumed["eval_before"]["eval/accuracy"] == 0.25

    skipped = _stage(tmp_path, None, eval_before=False)
    assert skipped.evaluate_before(logger) == {} and skipped.evaluator.runs == 0

    known = {"eval/accuracy": 0.5, "eval/count": 8.0}
    reused = _stage(tmp_path, known)
    assert reused.evaluate_before(logger) == known and reused.evaluator.runs == 0
    # a resumed run keeps the evaluation it stored, whatever the caller passes
    resumed = _stage(tmp_path, known)
    resumed.resumed["eval_before"] = {"eval/accuracy": 0.125}
    assert resumed.evaluate_before(logger) == {"eval/accuracy": 0.125} and resumed.evaluator.runs == 0
    logger.close()


def test_eval_set_names_the_file_and_the_settings(tmp_path):
    f = tmp_path / "eval.json"
    cfg = load_config(None, [f"data.eval_file={f}", "rollout.val_temperature=0"])
    s = eval_set_of(cfg, cfg.grpo)
    assert s == {"file": str(f.resolve()), "image_root": str(tmp_path.resolve()), "max_samples": 0, "temperature": 0.0, "n": cfg.rollout.val_n,
                 "max_new_tokens": cfg.rollout.max_new_tokens, "grading": "upstream"}
    assert eval_set_of(cfg, cfg.sft) == s  # SFT and GRPO stages read the same set the same way
    # the same file with its images read from another folder is another set
    assert eval_set_of(load_config(None, [f"data.eval_file={f}", f"data.image_root={tmp_path / 'other'}",
                                          "rollout.val_temperature=0"]), cfg.grpo) != s
    cfg.grpo.eval_holdout = 4  # a slice of the stage's own training file: its own set
    assert eval_set_of(cfg, cfg.grpo) is None
    assert eval_set_of(load_config(None, ["data.eval_file="]), cfg.sft) is None


def test_known_evaluation_only_for_the_same_model_set_and_a_greedy_evaluation(tmp_path):
    f = tmp_path / "eval.json"
    cfg = load_config(None, [f"data.eval_file={f}", "rollout.val_temperature=0"])
    same = eval_set_of(cfg, cfg.grpo)
    after = {"eval/accuracy": 0.5, "eval/description_exact": 0.25, "eval/reward": 0.7, "eval/count": 8.0}
    results = {"sft": {"model_dir": "/w/sft/hf", "eval_after": after, "eval_set": same},
               "stage1": {"model_dir": "/w/sft/hf", "skipped": "3 questions, fewer than one rollout batch"}}
    # the reward-weighted score belongs to the SFT stage's rewards: not carried over
    assert known_evaluation(results, "/w/sft/hf", same) == {"eval/accuracy": 0.5, "eval/description_exact": 0.25,
                                                           "eval/count": 8.0}
    assert known_evaluation(results, "/w/stage1/hf", same) is None  # another model
    assert known_evaluation(results, "/w/sft/hf", {**same, "max_samples": 4}) is None  # another set
    assert known_evaluation(results, "/w/sft/hf", None) is None
    sampled = {**same, "temperature": 0.5}
    results["sft"]["eval_set"] = sampled
    assert known_evaluation(results, "/w/sft/hf", sampled) is None  # a sampled evaluation is measured again


def test_a_held_out_slice_and_an_eval_file_set_after_loading_are_refused(tmp_path):
    """The pipeline sets `grpo.eval_file` from `pipeline.eval_file` after the config is loaded: the check on the
    stage's final config still names both keys."""
    import pytest

    from pebr_mega.config import ConfigError
    from pebr_mega.trainer.stage_data import check_eval_source

    cfg = load_config(None, ["grpo.eval_holdout=4", "data.eval_file="])
    check_eval_source(cfg, cfg.grpo)  # the slice alone is fine
    cfg.grpo.eval_file = str(tmp_path / "eval.json")
    with pytest.raises(ConfigError, match=r"grpo.eval_holdout=4 and grpo.eval_file=.*eval.json"):
        check_eval_source(cfg, cfg.grpo)
    cfg.grpo.eval_file, cfg.data.eval_file = "", str(tmp_path / "val.json")
    with pytest.raises(ConfigError, match=r"grpo.eval_holdout=4 and data.eval_file=.*val.json"):
        check_eval_source(cfg, cfg.grpo)


def test_the_pipeline_stages_take_their_eval_file_from_the_config_layer(tmp_path):
    """`pipeline.eval_file`, where set, is every pipeline stage's held-out set (SFT: as `data.eval_file`, under its
    own `sft.eval_file`; GRPO: as `grpo.eval_file`); unset, each stage keeps its own keys."""
    from pebr_mega.config import eval_source, pipeline_eval_files
    from pebr_mega.recipe.work_dir import grpo_stage_config, sft_stage_config

    own = ["data.eval_file=/d.json", "grpo.eval_file=/g.json"]
    cfg = load_config(None, ["pipeline.eval_file=/p.json", *own])
    assert pipeline_eval_files(cfg) == {"data.eval_file": "/p.json", "grpo.eval_file": "/p.json"}
    sft, grpo = sft_stage_config(cfg, tmp_path), grpo_stage_config(cfg, tmp_path, "stage2", tmp_path / "m.json", "")
    assert eval_source(sft, sft.sft).path == "/p.json" and eval_source(grpo, grpo.grpo).path == "/p.json"
    sft = sft_stage_config(load_config(None, ["pipeline.eval_file=/p.json", "sft.eval_file=/s.json"]), tmp_path)
    assert eval_source(sft, sft.sft).path == "/s.json"  # the stage's own key wins over the shared one
    cfg = load_config(None, own)
    assert pipeline_eval_files(cfg) == {"data.eval_file": "/d.json", "grpo.eval_file": "/g.json"}
    assert grpo_stage_config(cfg, tmp_path, "stage1", tmp_path / "e.json", "").grpo.eval_file == "/g.json"


def test_the_pipeline_skips_a_grpo_stage_without_one_full_batch_after_the_held_out_slice(tmp_path):
    import json

    from pebr_mega.recipe.work_dir import grpo_skip_reason

    split = tmp_path / "easycase.json"
    split.write_text(json.dumps([{"qid": str(i)} for i in range(6)]))
    cfg = load_config(None, ["grpo.rollout_batch_size=4", "data.eval_file="])
    assert grpo_skip_reason(cfg, split) is None  # 6 questions: one batch of 4
    cfg.grpo.eval_holdout = 3  # 3 left to train on: the trainer would find no full batch
    assert grpo_skip_reason(cfg, split) == (f"6 questions in {split} (3 held out for evaluation), fewer than one "
                                            "rollout batch (grpo.rollout_batch_size=4)")
    assert grpo_skip_reason(cfg, tmp_path / "missing.json").startswith("0 questions")
