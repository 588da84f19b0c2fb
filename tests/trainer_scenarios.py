"""The trainers and the demo as `pebr` runs them, in their own processes (started by conftest).

Three independent jobs: the trainer scenarios (SFT, a GRPO stage run straight and interrupted/resumed, a
non-finite reward and an unbuildable batch, the pipeline) on the tiny model; `pebr demo` at toy sizes; and
the kills (`pebr train` and `pebr pipeline` SIGKILLed at chosen points and rerun, with
tests/kill_resume.py). Megatron enters the CPU compatibility layer only inside its own calls there, and the
pytest process never initialises process groups or touches Megatron's globals. conftest starts the jobs as
soon as the tests are collected, so they run beside the rest of the suite; tests/trainer/test_trainer.py,
tests/recipe/test_demo.py and tests/test_reliability.py check what they report (`trainer_runs`).
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import conftest  # noqa: F401  (offline settings and the Triton mode, as in the tests)
from pebr_mega.config import load_config


def _args(tmp: Path, model: Path, data: Path, *extra: str) -> list[str]:
    """The tiny runs' settings as `key=value` overrides (what `pebr` takes on its command line)."""
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
    """A GRPO stage run straight, and run twice more with real signals sent to this process, then resumed:
    one SIGINT in step 2's rollout (step 2 finishes, is saved, and the run stops), and a SIGINT in step 3's
    rollout followed by a second one in its update (the run aborts: nothing more is saved; step 2's
    periodic checkpoint stays as it was)."""
    import os
    import signal

    import torch

    from pebr_mega.trainer.grpo import GRPOTrainer
    from pebr_mega.run.interrupt import StopRequested

    def config(name, *extra):
        return _grpo(tmp / name, model, data, "grpo.max_steps=3", "grpo.save_every=0", "grpo.eval_every=2",
                     "logging.log_generations=2", *extra)

    res = GRPOTrainer(config("full")).train()
    out = {"result": res.to_dict()}

    def signalled_run(name, signals, *extra):
        """Run `name`, sending SIGINT to this process when step `k` enters `method`, for each (method, k)."""
        originals = {method: getattr(GRPOTrainer, method) for method, _ in signals}

        def sending(method, step):
            def wrapper(self, *args, **kwargs):
                if self.step + 1 == step:
                    os.kill(os.getpid(), signal.SIGINT)
                return originals[method](self, *args, **kwargs)
            return wrapper

        for method, step in signals:
            setattr(GRPOTrainer, method, sending(method, step))
        try:
            GRPOTrainer(config(name, *extra)).train()
            how = "finished"
        except StopRequested:
            how = "stopped"
        except KeyboardInterrupt:
            how = "aborted"
        finally:
            for method, original in originals.items():
                setattr(GRPOTrainer, method, original)
        ckpts = tmp / name / "checkpoints"
        saved = {p.name: torch.load(p / "trainer_state.pt", weights_only=False)["data"]
                 for p in sorted(ckpts.glob("step_*"))} if ckpts.is_dir() else {}
        manifests = {p.name: (p / "MANIFEST.json").stat().st_mtime_ns for p in ckpts.glob("step_*")}
        rows = read_metrics(tmp / name / "metrics.jsonl")
        GRPOTrainer(config(name, *extra)).train()
        return {"how": how, "saved": saved, "manifests": manifests, "steps_logged": [r["step"] for r in rows]}

    from pebr_mega.logging import read_metrics

    out["stop"] = signalled_run("part", [("rollout", 2)])
    out["abort"] = signalled_run("part_abort", [("rollout", 3), ("_update", 3)], "grpo.save_every=1")
    out["abort"]["after_resume"] = {p.name: (p / "MANIFEST.json").stat().st_mtime_ns
                                    for p in (tmp / "part_abort" / "checkpoints").glob("step_*")}
    return out


def _non_finite_reward(model, data, tmp):
    """Two steps of one trainer on four records in file order: the first batch scores NaN (the update is
    skipped), the second holds only records whose image files are cut in half: their headers pass the
    screen before batching, their pixels do not decode (no request can be built: the step is skipped and
    counted, and the data position moves on)."""
    import shutil

    from pebr_mega.trainer.grpo import GRPOTrainer

    records = json.loads((data / "grpo.json").read_text())[:4]
    for r in records[2:]:
        bad = f"truncated_{r['qid']}.png"
        whole = (data / r["images"][0]).read_bytes()
        (tmp / bad).write_bytes(whole[: len(whole) // 2])
        r["images"] = [bad]
    for r in records[:2]:
        shutil.copy(data / r["images"][0], tmp / Path(r["images"][0]).name)
        r["images"] = [Path(r["images"][0]).name]
    (tmp / "grpo4.json").write_text(json.dumps(records))
    trainer = GRPOTrainer(_grpo(tmp / "run", model, data, "grpo.max_steps=2", "grpo.save_every=0", "data.eval_file=",
                                f"grpo.train_file={tmp / 'grpo4.json'}", "grpo.shuffle=false",
                                "grpo.rollout_batch_size=2", "grpo.mini_batch_size=1"))
    real_score = trainer.reward_model.score

    def nan_scores(batch):
        out = real_score(batch)
        for r in out:
            r.total = float("nan")
        return out

    trainer.reward_model.score = nan_scores
    before = [p.detach().clone() for p in trainer.actor.module.parameters()]
    m = trainer.train_step()
    unchanged = all(bool((a == p).all()) for a, p in zip(before, trainer.actor.module.parameters()))
    empty = trainer.train_step()
    return {"skipped_updates": m["skipped_updates"], "unchanged": unchanged, "empty": empty,
            "position": trainer.sampler.position.state_dict()}


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


def _count_engines() -> dict:
    """Instrument the real HF engine class in this scenario process: how many engines were built, how many
    were shut down, and how many were still running whenever a new one was built (a stage's engine must be
    gone before the next stage starts its own)."""
    from pebr_mega.rollout.hf_engine import HFRolloutEngine

    seen = {"built": 0, "shut_down": 0, "running_at_build": []}
    init, shutdown = HFRolloutEngine.__init__, HFRolloutEngine.shutdown

    def counted_init(self, *args, **kwargs):
        seen["running_at_build"].append(seen["built"] - seen["shut_down"])
        seen["built"] += 1
        init(self, *args, **kwargs)

    def counted_shutdown(self):
        seen["shut_down"] += 1
        shutdown(self)

    HFRolloutEngine.__init__, HFRolloutEngine.shutdown = counted_init, counted_shutdown
    return seen


def _pipeline(model, data, tmp):
    from pebr_mega.recipe.pipeline import run_pipeline
    from pebr_mega.recipe.work_dir import stage_result

    engines = _count_engines()

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
    out["engines"] = engines
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
    """`pebr demo` at toy sizes, as a user runs it, under tools/profile_demo.py (CI's run of the profiler);
    its exit code and what it printed."""
    import contextlib
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("profile_demo", Path(__file__).parents[1] / "tools" / "profile_demo.py")
    profile_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_demo)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            rc = profile_demo.main(["--out", out, "--toy"])
    except BaseException:
        return {"error": traceback.format_exc()}
    return {"rc": rc, "printed": printed.getvalue()}


# ---------------------------------------------------------------------------------------------- the kills
# Where `pebr train` and `pebr pipeline` are SIGKILLed, in turn (tests/kill_resume.py's points: the n-th call
# of the run that is killed). tools/soak_kill_resume.py draws many more at random.
TRAIN_KILLS = (("update", 3), ("save", 1), ("metrics", 1))
PIPELINE_KILLS = (("save", 2), ("generate", 2), ("update", 2))


def train_argv(root: Path, model: Path, data: Path) -> list[str]:
    """A tiny `pebr train`: 4 steps, a checkpoint and an evaluation every 2, generations logged."""
    return ["train", *_grpo_args(root, model, data, "grpo.max_steps=4", "grpo.save_every=2", "grpo.eval_every=2",
                                     "grpo.keep_last=2", "grpo.rollout_batch_size=2", "grpo.eval_max_samples=2",
                                     "rollout.n=2", "rollout.max_new_tokens=8", "logging.log_generations=2",
                                     "rewards.num_workers=1")]


def pipeline_argv(root: Path, model: Path, data: Path) -> list[str]:
    """A tiny `pebr pipeline`: SFT (2 steps), sampling (2 batches), split (every question easy), stage 1
    (2 steps) and the export; a checkpoint at every step."""
    return ["pipeline", *_args(root / "unused", model, data, f"pipeline.work_dir={root}",
                                   f"pipeline.base_model={model}", f"pipeline.sft_file={data / 'sft.json'}",
                                   f"pipeline.grpo_file={data / 'grpo.json'}",
                                   "pipeline.stages=[sft,sample,split,stage1,export]", "data.eval_file=",
                                   "sft.epochs=1", "sft.batch_size=8", "sft.save_every=1", "sample.n=2",
                                   "sample.batch_size=8", "sample.correct_threshold=0.0", "grpo.max_steps=2",
                                   "grpo.save_every=1", "grpo.rollout_batch_size=2", "grpo.mini_batch_size=2",
                                   "rollout.n=2", "rollout.max_new_tokens=8", "rewards.weights.clip=0.0",
                                   "rewards.num_workers=1", "logging.log_generations=1")]


def kills(model: Path, data: Path, out: Path) -> dict:
    """The kill chains of `pebr train` and `pebr pipeline` against their uninterrupted runs, then what a
    rerun with other settings does (`--force-restart`; an empty train file). Returns what the tests check."""
    import kill_resume as kr

    logs = out / "logs"
    logs.mkdir(parents=True)
    report: dict = {"model": str(model), "data": str(data)}
    for name, argv, chain in (("train", train_argv, TRAIN_KILLS), ("pipeline", pipeline_argv, PIPELINE_KILLS)):
        ref = kr.run_child(argv(out / f"{name}_ref", model, data), logs / f"{name}_ref.log")
        if ref["rc"] != 0:
            raise RuntimeError(f"the uninterrupted {name} run failed:\n{ref['log']}")
        (logs / name).mkdir()
        report[name] = {"argv": argv(out / name, model, data), "reference_counts": ref["counts"],
                        **kr.kill_chain(argv(out / name, model, data), out / name, out / f"{name}_ref", chain,
                                        logs / name)}
    # A rerun of the finished train run with another learning rate: one line, nothing touched.
    run = out / "train"
    before = sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*"))
    mismatch = kr.run_child([*report["train"]["argv"], "actor.lr=2e-3"], logs / "mismatch.log")
    report["mismatch"] = {"rc": mismatch["rc"], "log": mismatch["log"], "checkpoints_before": before,
                          "checkpoints": sorted(str(p.relative_to(run)) for p in (run / "checkpoints").rglob("*"))}
    # --force-restart into the finished train run, with an empty train file: the old run is discarded, then
    # the empty file is a one-line error before any model is built.
    (out / "empty.json").write_text("[]")
    restarted = kr.run_child([*report["train"]["argv"], f"grpo.train_file={out / 'empty.json'}", "--force-restart"],
                             logs / "restart_empty.log")
    report["restart_empty"] = {"rc": restarted["rc"], "log": restarted["log"], "counts": restarted["counts"],
                               "left": sorted(p.name for p in run.iterdir())}
    return report


def run_job(job: str, out: Path) -> dict:
    """`trainers`: the tiny model and synthetic data, then every trainer scenario; `demo`: `pebr demo`;
    `kills`: the kill chains (`kills`)."""
    import torch

    torch.set_num_threads(1)  # as in the pytest process (conftest): tiny matmuls on a small machine
    if job == "demo":
        return demo(str(out / "demo"))
    from pebr_mega.data.corpus import tokenizer_corpus
    from pebr_mega.data.synthetic import SynthConfig, write_synthetic_dataset
    from pebr_mega.models.tiny import TinyModelConfig, build_tiny_model

    model = build_tiny_model(out / "model", TinyModelConfig(seed=0), tokenizer_corpus())
    data = write_synthetic_dataset(out / "synth", SynthConfig(num=12, num_sft=16, num_eval=4, seed=3)).out_dir
    if job == "kills":
        import kill_resume

        kill_resume.preload()
        return kills(Path(model), Path(data), out / "kills")
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the kills job forks after training a tokenizer
    sys.path.insert(0, str(Path(__file__).parent))
    job_name, out_dir = sys.argv[1], Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_job(job_name, out_dir)
    (out_dir / "result.json").write_text(json.dumps(result, default=str))
