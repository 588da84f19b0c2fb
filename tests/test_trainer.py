"""The trainers end to end on the tiny model: SFT learns, a GRPO stage runs every phase and logs its
metrics, every rollout samples from the actor's current weights, an interrupted run resumes to exactly the
metrics of an uninterrupted one, and the pipeline skips finished stages.

The trainers run in one spawned process (`_trainer_worker`), as `pebr` runs them: Megatron enters the CPU
compatibility layer only inside its own calls there, and this pytest process never initialises process
groups or touches Megatron's globals. The tests below check what the worker reports.
"""
from __future__ import annotations

import json
import math
import traceback
from pathlib import Path

import pytest

from pebr_mega.config import load_config
from pebr_mega.logging import read_metrics
from pebr_mega.parallel.launch import spawn

pytestmark = pytest.mark.slow

# Metrics that measure the machine, not the computation: excluded from the resume comparison.
_TIMING = ("time/", "tokens_per_s", "tflops", "mfu", "wall")


def _cfg(tmp: Path, model: Path, data: Path, *extra: str):
    return load_config(None, [
        f"run.output_dir={tmp}", "model.spec=torch", "model.params_dtype=float32",
        "images.min_pixels=3136", "images.max_pixels=50176", "logging.progress_bar=false",
        f"data.eval_file={data / 'eval.json'}", "rollout.n=4", "rollout.max_new_tokens=12",
        "rollout.val_temperature=0.0", "actor.micro_batch_tokens=2048", *extra])


def _grpo(tmp, model, data, *extra):
    return _cfg(tmp, model, data, "rewards.stage=stage2", "grpo.stage=stage2", f"grpo.init_model={model}",
                f"grpo.train_file={data / 'grpo.json'}", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=2",
                "actor.lr=1e-3", *extra)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in rows]


# ------------------------------------------------------------------------------------------------ scenarios
def _sft(model, data, tmp):
    from pebr_mega.trainer.sft import SFTTrainer

    cfg = _cfg(tmp, model, data, f"sft.init_model={model}", f"sft.train_file={data / 'sft.json'}", "sft.lr=3e-3",
               "sft.epochs=3", "sft.batch_size=8", "sft.freeze_vision=false", "sft.freeze_projector=false",
               "data.eval_file=")
    return {"model_dir": SFTTrainer(cfg).train().model_dir}


def _grpo_full_and_resumed(model, data, tmp):
    from pebr_mega.trainer.grpo import GRPOTrainer

    def config(name):
        return _grpo(tmp / name, model, data, "grpo.max_steps=3", "grpo.save_every=0", "grpo.eval_every=2")

    res = GRPOTrainer(config("full")).train()
    # Interrupt the same run after step 2 (Ctrl-C): it saves and exits; a new run resumes at step 2.
    original, calls = GRPOTrainer.train_step, {"n": 0}

    def interrupting(self):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self)

    GRPOTrainer.train_step = interrupting
    try:
        GRPOTrainer(config("part")).train()
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    finally:
        GRPOTrainer.train_step = original
    saved = (tmp / "part" / "checkpoints" / "step_2" / "COMPLETE").is_file()
    GRPOTrainer(config("part")).train()
    return {"result": res.to_dict(), "interrupted": interrupted, "saved_step_2": saved}


def _non_finite_reward(model, data, tmp):
    from pebr_mega.trainer.grpo import GRPOTrainer

    trainer = GRPOTrainer(_grpo(tmp, model, data, "grpo.max_steps=1", "grpo.save_every=0", "data.eval_file="))
    real_score = trainer.reward_model.score

    def nan_scores(batch):
        out = real_score(batch)
        for r in out:
            r.total = float("nan")
        return out

    trainer.reward_model.score = nan_scores
    before = [p.detach().clone() for p in trainer.actor.module.parameters()]
    m = trainer.train_step()
    return {"skipped_updates": m["skipped_updates"],
            "unchanged": all(bool((a == p).all()) for a, p in zip(before, trainer.actor.module.parameters()))}


def _pipeline(model, data, tmp):
    from pebr_mega.trainer.pipeline import run_pipeline, stage_result

    cfg = _cfg(tmp, model, data, f"pipeline.work_dir={tmp / 'work'}", f"pipeline.base_model={model}",
               f"pipeline.sft_file={data / 'sft.json'}", f"pipeline.grpo_file={data / 'grpo.json'}", "sample.n=2",
               "sample.batch_size=8", "pipeline.stages=[sft,sample,split]", "sft.epochs=1", "sft.batch_size=8",
               "data.eval_file=")
    first = run_pipeline(cfg)
    log: list[str] = []
    again = run_pipeline(cfg, log=log.append)
    out = {"first": sorted(first), "counts": stage_result(tmp / "work", "split")["counts"],
           "again_counts": again["split"]["counts"], "log": log}
    # Stage 2 on a medium set written by the split (its images resolve against the source data's folder),
    # stage 1 skipped when the easy set is empty, and the final export.
    split = tmp / "work" / "split"
    (split / "easycase.json").write_text("[]")
    (split / "mediumcase.json").write_text(json.dumps(json.loads((data / "grpo.json").read_text())[:2]))
    cfg.pipeline.stages = ["sft", "sample", "split", "stage1", "stage2", "export"]
    cfg.grpo.max_steps, cfg.grpo.rollout_batch_size, cfg.grpo.mini_batch_size = 1, 2, 2
    out["full"] = run_pipeline(cfg)
    return out


SCENARIOS = {"sft": _sft, "grpo": _grpo_full_and_resumed, "nan": _non_finite_reward, "pipeline": _pipeline}


def _trainer_worker(rank, model, data, tmp):
    import torch

    torch.set_num_threads(1)  # as in this process (conftest): tiny matmuls, a shared 2-core machine
    out = {}
    for name, scenario in SCENARIOS.items():
        (Path(tmp) / name).mkdir()
        try:
            out[name] = scenario(Path(model), Path(data), Path(tmp) / name)
        except BaseException:  # reported to the test of that scenario, the others still run
            out[name] = {"error": traceback.format_exc()}
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset

    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"),
                                   SynthConfig(num=12, num_sft=16, num_eval=4, seed=3)).out_dir


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainers")
    results = spawn(_trainer_worker, 1, str(tiny_model_dir), str(data), str(tmp), megatron_only=False)[0]
    return {"tmp": tmp, **results}


def _ok(runs, name):
    got = runs[name]
    if "error" in got:
        pytest.fail(f"the {name} scenario raised in the trainer worker:\n{got['error']}")
    return got


# ------------------------------------------------------------------------------------------------ tests
def test_sft_lowers_the_loss_and_exports_a_loadable_model(runs):
    from transformers import Qwen2_5_VLForConditionalGeneration

    res = _ok(runs, "sft")
    losses = [r["loss"] for r in read_metrics(runs["tmp"] / "sft" / "metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    Qwen2_5_VLForConditionalGeneration.from_pretrained(res["model_dir"])


def test_every_rollout_samples_from_the_actors_current_weights(runs):
    """Issue 11, defect 1: the engine's weights are gone after each release (SGLang; the HF engine enforces
    it), so every rollout phase after the first must sync them from the actor. With lr 1e-3 the actor moves
    each step: the engine's log-probs equal the actor's (mismatch 1) at every step, and the evaluations before,
    during (step 2) and after training run on the synced weights too."""
    res = _ok(runs, "grpo")["result"]
    rows = read_metrics(runs["tmp"] / "grpo" / "full" / "metrics.jsonl")
    steps = [r for r in rows if "reward/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isclose(r["mismatch/token_mult_prob_error"], 1.0, abs_tol=5e-3), r["step"]
        assert r["sync/bytes"] > 0
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [2]
    assert res["eval_before"] and res["eval_after"]


def test_grpo_stage_resumes_to_the_uninterrupted_metrics(runs):
    got = _ok(runs, "grpo")
    rows = read_metrics(runs["tmp"] / "grpo" / "full" / "metrics.jsonl")
    for key in ("reward/total", "reward/accuracy", "loss", "kl", "entropy", "clip_frac", "grad_norm", "lr",
                "time/rollout", "time/logprobs", "time/update", "time/sync", "tokens_per_s",
                "mismatch/token_mult_prob_error", "response_length/mean", "sync/bytes"):
        assert key in rows[-1] and rows[-1][key] is not None, key
    assert Path(got["result"]["model_dir"], "config.json").is_file()
    assert got["interrupted"] and got["saved_step_2"]
    resumed = read_metrics(runs["tmp"] / "grpo" / "part" / "metrics.jsonl")
    assert [r["step"] for r in resumed if "reward/total" in r] == [1, 2, 3]
    assert _comparable(resumed) == _comparable(rows)


def test_non_finite_reward_skips_the_update(runs):
    got = _ok(runs, "nan")
    assert got["skipped_updates"] == 2 and got["unchanged"]


def test_pipeline_skips_finished_stages(runs):
    got = _ok(runs, "pipeline")
    work = runs["tmp"] / "pipeline" / "work"
    assert got["first"] == ["sample", "sft", "split"]
    rollouts = (work / "sample" / "rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 12 * 2 and {"qid", "response", "ground_truth", "score"} <= set(json.loads(rollouts[0]))
    counts = got["counts"]
    assert counts["easy"] + counts["medium"] + counts["hard"] == 12
    assert any("sft: already done" in line for line in got["log"]) and got["again_counts"] == counts
    res = got["full"]
    assert "skipped" in res["stage1"] and res["stage2"]["steps"] == 1
    assert Path(res["export"]["model_dir"], "model.safetensors").is_file()
    assert res["export"]["source"] == res["stage2"]["model_dir"]
