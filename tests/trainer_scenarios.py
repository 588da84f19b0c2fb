"""The trainers and the demo as `pebr` runs them, in their own processes (started by conftest).

Two independent jobs: the trainer scenarios (SFT, a GRPO stage run straight and interrupted/resumed, a
non-finite reward, the pipeline) on the tiny model, and `pebr demo` at toy sizes. Megatron enters the CPU
compatibility layer only inside its own calls there, and the pytest process never initialises process groups
or touches Megatron's globals. conftest starts both as soon as the tests are collected, so they run beside
the rest of the suite; tests/test_trainer.py and tests/test_demo.py check what they report (`trainer_runs`).
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import conftest  # noqa: F401  (binds pebr_mega.kernels to this checkout; offline settings, as in the tests)
from pebr_mega.config import load_config


def _args(tmp: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return [f"run.output_dir={tmp}", "model.spec=torch", "model.params_dtype=float32",
            "images.min_pixels=3136", "images.max_pixels=50176", "logging.progress_bar=false",
            f"data.eval_file={data / 'eval.json'}", "rollout.n=4", "rollout.max_new_tokens=12",
            "rollout.val_temperature=0.0", "actor.micro_batch_tokens=2048", *extra]


def _cfg(tmp: Path, model: Path, data: Path, *extra: str):
    return load_config(None, _args(tmp, model, data, *extra))


def _grpo_args(tmp, model, data, *extra) -> list[str]:
    # grpo.stage alone: the one stage switch picks the stage-2 sizes and reward preset (issue 13, item 5)
    return _args(tmp, model, data, "grpo.stage=stage2", f"grpo.init_model={model}",
                 f"grpo.train_file={data / 'grpo.json'}", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=2",
                 "actor.lr=1e-3", *extra)


def _grpo(tmp, model, data, *extra):
    return load_config(None, _grpo_args(tmp, model, data, *extra))


def _sft(model, data, tmp):
    from pebr_mega.trainer.sft import SFTTrainer

    template = tmp / "my_format.jinja"
    template.write_text("Answer in sections.\n\n{{ content | trim }}\n")
    cfg = _cfg(tmp / "run", model, data, f"sft.init_model={model}", f"sft.train_file={data / 'sft.json'}", "sft.lr=3e-3",
               "sft.epochs=3", "sft.batch_size=8", "sft.freeze_vision=false", "sft.freeze_projector=false",
               "data.eval_file=", f"data.format_prompt={template}")
    return {"model_dir": SFTTrainer(cfg).train().model_dir, "template": str(template)}


def _grpo_full_and_resumed(model, data, tmp):
    from pebr_mega.trainer.grpo import GRPOTrainer

    def config(name):
        return _grpo(tmp / name, model, data, "grpo.max_steps=3", "grpo.save_every=0", "grpo.eval_every=2",
                     "logging.log_generations=2")

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


def _epochs_holdout_and_dry_run(model, data, tmp):
    """A stage-2 run over 2 epochs with 2 of the 12 questions held out: `pebr train --dry-run` first (its plan),
    then the run, recording the qids of every batch the trainer draws from its (real) sampler."""
    import contextlib
    import io

    from pebr_mega.cli import main
    from pebr_mega.logging import read_metrics
    from pebr_mega.trainer.grpo import GRPOTrainer

    args = _grpo_args(tmp / "run", model, data, "data.eval_file=", "grpo.eval_holdout=2", "grpo.mini_batch_size=4",
                      "rollout.n=2", "grpo.save_every=0")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["train", "--dry-run", *args])
    dry_run_wrote = (tmp / "run").exists()
    started = io.StringIO()
    with contextlib.redirect_stdout(started):
        trainer = GRPOTrainer(load_config(None, args))
    batches, draw = [], trainer.sampler.next_batch

    def recording():
        epoch, batch = draw()
        batches.append([r.qid for r in batch])
        return epoch, batch

    trainer.sampler.next_batch = recording
    res = trainer.train()
    rows = [r for r in read_metrics(tmp / "run" / "metrics.jsonl") if "reward/total" in r]
    return {"rc": rc, "plan": json.loads(printed.getvalue()), "dry_run_wrote": dry_run_wrote, "started": started.getvalue(),
            "total_steps": trainer.total_steps, "batches": batches, "train_qids": [r.qid for r in trainer.records],
            "holdout_qids": [r.qid for r in trainer.data.holdout], "reward_weights": trainer.reward_model.weights,
            "epochs": [r["epoch"] for r in rows], "result": res.to_dict()}


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


SCENARIOS = {"sft": _sft, "grpo": _grpo_full_and_resumed, "nan": _non_finite_reward,
             "epochs": _epochs_holdout_and_dry_run, "pipeline": _pipeline}


def trainer_scenarios(model: str, data: str, tmp: str) -> dict:
    """Every trainer scenario, each in its own folder of `tmp`; a failing one reports its traceback."""
    out = {}
    Path(tmp).mkdir(parents=True, exist_ok=True)
    for name, scenario in SCENARIOS.items():
        (Path(tmp) / name).mkdir()
        try:
            out[name] = scenario(Path(model), Path(data), Path(tmp) / name)
        except BaseException:  # reported to the test of that scenario, the others still run
            out[name] = {"error": traceback.format_exc()}
    return out


def demo(out: str) -> dict:
    """`pebr demo` at toy sizes, as a user runs it; its exit code and what it printed."""
    import contextlib
    import io

    from pebr_mega.cli import main

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            rc = main(["demo", "--out", out, "--num-grpo", "8", "--num-sft", "16", "--num-eval", "4",
                       "--clip-steps", "4", "sft.epochs=1", "sft.batch_size=8", "sample.n=2", "rollout.n=2", "rollout.max_new_tokens=12",
                       "grpo.rollout_batch_size=2", "grpo.mini_batch_size=2", "grpo.max_steps=1",
                       "logging.progress_bar=false"])
    except BaseException:
        return {"error": traceback.format_exc()}
    return {"rc": rc, "printed": printed.getvalue()}


def run_job(job: str, out: Path) -> dict:
    """`trainers`: the tiny model and synthetic data, then every trainer scenario; `demo`: `pebr demo`."""
    import torch

    torch.set_num_threads(1)  # as in the pytest process (conftest): tiny matmuls on a small machine
    if job == "demo":
        return demo(str(out / "demo"))
    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(out / "model", TinyModelConfig(seed=0), tokenizer_corpus())
    data = write_synthetic_dataset(out / "synth", SynthConfig(num=12, num_sft=16, num_eval=4, seed=3)).out_dir
    return trainer_scenarios(str(model), str(data), str(out / "trainers"))


if __name__ == "__main__":  # python tests/trainer_scenarios.py {trainers|demo} OUT_DIR  (started by conftest)
    import sys

    import os
    import threading
    import time

    def _exit_with_pytest(parent: int = os.getppid()) -> None:
        while os.getppid() == parent:  # a pytest killed without its session-finish hook leaves no orphan
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=_exit_with_pytest, daemon=True).start()
    job_name, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_job(job_name, out_dir)
    (out_dir / "result.json").write_text(json.dumps(result, default=str))
