"""The one stage loop: resume, periodic evaluation and saves, Ctrl-C, final save, evaluation, export, result.

`StageTrainer.train()` owns the loop; a stage (GRPO, SFT) implements `train_step()` and builds its parts in
its constructor with the helpers here, in the order memory needs (torchtitan's shape: small methods named
by step). Each concern has one place, so later work extends the loop without copying it:

- resume: `resume()`;           - Ctrl-C / SIGTERM: `stop_if_requested()`, `on_abort()`;
- saving: `save()`;             - evaluation: `evaluate()`;
- metrics: the `MetricsLogger` from `make_logger()`, and `summarize()` / `write_result()` for `result.json`.

What survives what (docs/TRAINING.md has the table):
- A step k is done when its metrics row, its periodic evaluation and its periodic save are; a checkpoint of
  step k is published only after every row of step k is in `metrics.jsonl`, so a kill anywhere leaves a
  newest checkpoint whose rows are all written, and a rerun resumes there and cuts the metrics back to it.
- Ctrl-C or SIGTERM inside step k (`pebr_mega.run.interrupt`): step k finishes, step k is saved (unless
  its periodic save did it), one line says where, and the run exits; a rerun goes on with step k+1. A second
  one aborts at once and saves nothing: the newest checkpoint stays as it was, and a rerun repeats what came
  after it.
- A run directory records the settings of its run (`fingerprint.json`); another run's settings stop the
  start-up, or, told to restart, discard the old state (`RunContext.for_training`, `run_dir.inspect_run_dir`).

Build order (`build_engine` before `build_actor`): the rollout engine starts first and releases its memory,
because SGLang sizes its KV pool from the GPU memory free when it loads; the actor and the reference
allocate afterwards, and every rollout phase syncs the actor's weights into the engine.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pebr_mega.actor.config import ActorConfig
from pebr_mega.actor.megatron_actor import MegatronActor, build_actor
from pebr_mega.checkpoint.export import export_to_hf
from pebr_mega.checkpoint.gather import count_parameters
from pebr_mega.config import PebrConfig, eval_source, to_dict
from pebr_mega.data.records import image_root_for
from pebr_mega.errors import storage_errors
from pebr_mega.logging import LoggingConfig, MetricsLogger, read_metrics
from pebr_mega.parallel.groups import is_main_rank
from pebr_mega.rewards import RewardModel
from pebr_mega.rollout.factory import make_rollout_engine
from pebr_mega.stage_config import StageLoopConfig
from pebr_mega.run.stage_checkpoints import StageCheckpoints
from pebr_mega.run.run_dir import EVAL_RESULTS_FILE, RunSpec
from pebr_mega.trainer.context import RunContext
from pebr_mega.trainer.data_order import EpochSampler
from pebr_mega.trainer.divergence import DivergedError, DivergenceGuard
from pebr_mega.trainer.evaluate import Evaluator
from pebr_mega.run.interrupt import StopRequested, StopRequests
from pebr_mega.trainer.lifecycle import EngineLifecycle, actor_weights

# Dense bf16 peak of the cards we know, for MFU (TFLOP/s).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass
class StageResult:
    """What a stage produced: its final HF model, held-out metrics before/after and the mean reward."""

    model_dir: str
    steps: int
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    eval_set: dict | None = None  # what the evaluations measured on (`eval_set_of`)
    mean_reward: float = float("nan")
    first_reward: float = float("nan")
    last_reward: float = float("nan")
    first_loss: float = float("nan")  # SFT: the loss of the first and the last step
    last_loss: float = float("nan")

    def to_dict(self) -> dict:
        """Standard JSON: a number that is not available (NaN) is None (`null`), in nested metrics too."""
        return _finite_or_none(dict(self.__dict__))


def eval_set_of(cfg: PebrConfig, loop: StageLoopConfig) -> dict | None:
    """What a stage's held-out evaluation measures on: its file (resolved) and sample cap; None when it has no
    evaluation set or evaluates on a slice of its own training file (`grpo.eval_holdout`). Two stages with the
    same `eval_set` give the same model the same evaluation when it is greedy (temperature 0)."""
    if getattr(loop, "eval_holdout", 0):
        return None
    eval_file = eval_source(cfg, loop).path
    if not eval_file:
        return None
    r = cfg.rollout
    root = Path(image_root_for(eval_file, cfg.data.image_root)).resolve()  # where its images are read from
    return {"file": str(Path(eval_file).resolve()), "image_root": str(root), "max_samples": loop.eval_max_samples,
            "temperature": r.val_temperature, "n": r.val_n, "max_new_tokens": r.max_new_tokens,
            "grading": cfg.rewards.answer_grading}


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    return v


class StageTrainer:
    """The loop every stage runs; subclasses set the parts below and implement `train_step()`."""

    name: str  # the stage's name: progress bar, messages, checkpoint metadata
    ctx: RunContext
    loop: StageLoopConfig
    actor: MegatronActor
    sampler: EpochSampler
    total_steps: int
    lifecycle: EngineLifecycle | None = None
    evaluator: Evaluator | None = None
    step: int = 0
    lr_key = "actor.lr"  # the key to lower when updates diverge (SFT: its own sft.lr)

    def __init__(self, cfg: PebrConfig, loop: StageLoopConfig, spec: RunSpec, restart: bool = False,
                 eval_before: dict | None = None) -> None:
        self.cfg = cfg
        self.loop = loop
        # the starting model's evaluation on this stage's set, when the caller has it (the pipeline's previous stage)
        self.known_eval_before = eval_before or None
        self.name = spec.stage
        self.init_model = spec.init_model
        self.ctx = RunContext.for_training(cfg, spec, restart=restart)
        self.checkpoints = StageCheckpoints(self.ctx.out_dir / "checkpoints", loop.keep_last, spec.stage)
        self.resumed: dict = {}  # the trainer state of the checkpoint this run resumed from
        self._num_params: int | None = None

    # ------------------------------------------------------------------------------------------ building
    def build_engine(self) -> None:
        """The rollout engine from `init_model`, then released: call before `build_actor` (memory order)."""
        engine = make_rollout_engine(self.cfg.rollout, self.init_model, self.ctx.device, seed=self.cfg.run.seed)
        self.lifecycle = EngineLifecycle(engine)
        self.lifecycle.release()

    def build_actor(self, actor_cfg: ActorConfig, total_updates: int, trainable: bool = True) -> MegatronActor:
        """An actor from `init_model`; the trainable one becomes the engine's weight source."""
        actor = build_actor(self.init_model, self.cfg.model, actor_cfg, trainable=trainable,
                            total_updates=total_updates, lr=actor_cfg.lr)
        if trainable and self.lifecycle is not None:
            self.lifecycle.attach(actor_weights(actor, self.cfg.rollout.weight_bucket_mb))
        return actor

    def build_evaluator(self, reward_model: RewardModel | None) -> Evaluator | None:
        """The held-out evaluation of `loop.eval_file` (else `data.eval_file`); None without an eval set."""
        eval_file = eval_source(self.cfg, self.loop).path
        if not eval_file or self.lifecycle is None:
            return None
        return Evaluator(self.ctx, self.lifecycle, eval_file, self.loop.eval_max_samples, reward_model)

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> StageResult:
        """Run every remaining step (resuming from the newest checkpoint), evaluate, export; returns the result.

        The rollout engine is shut down when the stage ends, also on error or Ctrl-C: the pipeline's next
        stage builds its own in this process (`EngineLifecycle.close`)."""
        try:
            return self._train()
        finally:
            if self.lifecycle is not None:
                self.lifecycle.close()

    def _train(self) -> StageResult:
        self.step = self.resume()
        self.divergence = DivergenceGuard(self.name, self.lr_key, applied_at_start=self.actor.updates)
        logger = self.make_logger()
        result = StageResult(model_dir=str(self.ctx.out_dir / "hf"), steps=self.total_steps,
                             eval_set=eval_set_of(self.cfg, self.loop))
        with StopRequests() as stop:
            try:
                result.eval_before = self.evaluate_before(logger)
                while self.step < self.total_steps:
                    self.stop_if_requested(stop, logger)
                    self.run_step(logger)
                self.divergence.check_final(self.step, self.actor.updates, self.resume_point)
                if self.checkpoints.last_step() != self.step:
                    self.save()
                self.stop_if_requested(stop, logger)
            except StopRequested:
                raise
            except KeyboardInterrupt:
                self.on_abort(logger)
                raise
            except DivergedError:
                logger.close()
                raise
        per_question = self.ctx.out_dir / EVAL_RESULTS_FILE if is_main_rank() else None
        result.eval_after = self.evaluate("after", logger, results_path=per_question)
        logger.close()
        self.export(result.model_dir)
        self.summarize(result, read_metrics(self.ctx.out_dir / "metrics.jsonl"))
        self.write_result(result)
        return result

    def run_step(self, logger: MetricsLogger) -> None:
        """Step `self.step + 1` and its bookkeeping, in the order that keeps a kill safe: the metrics row, the
        periodic evaluation (logged at the step), then the periodic save."""
        metrics = self.train_step()
        self.step += 1
        logger.log(self.step, metrics)
        self.divergence.observe(metrics)
        # Before the step's save: a diverged step is never saved, the newest checkpoint stays the resume point.
        self.divergence.check(self.step, self.actor.updates, self.actor.weights_finite(), self.resume_point)
        if self.loop.eval_every and self.step % self.loop.eval_every == 0 and self.step < self.total_steps:
            self.evaluate(f"at step {self.step}", logger, log_step=self.step)
        if self.loop.save_every and self.step % self.loop.save_every == 0:
            self.save()

    def train_step(self) -> dict[str, float]:
        """One step of the stage; returns its metrics."""
        raise NotImplementedError

    def summarize(self, result: StageResult, rows: list[dict]) -> None:
        """Fill the stage-specific fields of `result` from the run's metrics rows."""

    # ------------------------------------------------------------------------------------------ one place each
    def export(self, model_dir: str) -> None:
        """The final HF model (with the run's format prompt, which the next stage, `pebr eval` and `pebr infer`
        use); a disk that refuses it is a one-line `StorageError` (the unfinished export is removed)."""
        # Any exception type: safetensors reports a full disk as its own error type (errors.storage_error).
        with storage_errors("exporting the final model", model_dir,
                            "the checkpoints are intact: free the space and rerun the same command to export it "
                            f"({self.checkpoints.root})"):
            export_to_hf(self.actor.module, self.init_model, model_dir, write_extra=self.ctx.write_prompt_template)

    def resume_point(self) -> str:
        """Where a rerun resumes, for messages: the newest checkpoint, or the start."""
        last = self.checkpoints.last_step()
        return (f"the newest checkpoint is {self.checkpoints.manager.path(last)}, where a rerun resumes" if last
                is not None else "no checkpoint was saved, a rerun starts over")

    def resume(self) -> int:
        """Load the newest complete checkpoint of this run, if any; returns the step to continue from."""
        state = self.checkpoints.load_latest(self.actor)
        if state is None:
            return 0
        if state.get("data"):
            self.sampler.load_state_dict(state["data"])
        self.resumed = state
        self.ctx.log(f"{self.name}: resumed from {self.checkpoints.root} (step {state['step']})")
        return int(state["step"])

    def save(self) -> None:
        """Checkpoint the actor and the trainer state (data position, stored evaluations) at `self.step`."""
        state = {"data": self.sampler.position.state_dict(),
                 **{k: v for k, v in self.resumed.items() if k.startswith("eval_")}}
        self.checkpoints.save(self.step, self.actor, state)

    def stop_if_requested(self, stop: StopRequests, logger: MetricsLogger) -> None:
        """At a step boundary: when a stop was asked for (on any rank), save the completed step unless it is
        saved already, say where a rerun goes on, and raise `StopRequested`."""
        if not stop.agreed():
            return
        if self.step > 0 and self.checkpoints.last_step() != self.step:
            self.save()
        where = (f"step {self.step} is saved in {self.checkpoints.manager.path(self.step)}" if self.step
                 else "no step was completed, nothing to save")
        logger.message(f"stopped by {stop.requested} after step {self.step} of {self.total_steps}: {where}; "
                       "rerun the same command to resume")
        logger.close()
        raise StopRequested(stop.requested)

    def on_abort(self, logger: MetricsLogger) -> None:
        """A second Ctrl-C (or any KeyboardInterrupt): nothing more is saved; say where a rerun resumes."""
        last = self.checkpoints.last_step()
        resume_at = f"step {last} ({self.checkpoints.manager.path(last)})" if last is not None else "the start"
        logger.message(f"aborted in step {self.step + 1}: nothing saved; a rerun resumes from {resume_at}")
        logger.close()

    def evaluate_before(self, logger: MetricsLogger) -> dict[str, float]:
        """The starting model's evaluation: the caller's (`eval_before=`, the same model on the same set), else
        measured, or none when `loop.eval_before` is off; a resumed run keeps the one it stored."""
        if "eval_before" not in self.resumed:
            if self.known_eval_before is not None:
                self.resumed["eval_before"] = dict(self.known_eval_before)
            elif not self.loop.eval_before:
                return {}
        return self.evaluate("before", logger, stored="eval_before")

    def evaluate(self, when: str, logger: MetricsLogger, stored: str | None = None,
                 log_step: int | None = None, results_path: Path | None = None) -> dict[str, float]:
        """One held-out evaluation ({} without an eval set), printed as one line.

        `stored`: the key under which a resumed run finds it (so a resume does not re-measure `before`);
        `log_step`: also write it to metrics.jsonl at that step; `results_path`: one row per question there.
        """
        if self.evaluator is None:
            return {}
        if stored is not None and stored in self.resumed:
            out = self.resumed[stored]
        else:
            out = self.evaluator.run(results_path)
            if stored is not None:
                self.resumed[stored] = out
        if log_step is not None:
            logger.log(log_step, out, console=False)
        if out:
            logger.message(eval_line(when, out))
        return out

    def make_logger(self) -> MetricsLogger:
        """The metrics logger of this run (appending when resumed); other ranks write under `.rank<r>/`."""
        main = is_main_rank()
        lcfg = self.cfg.logging if main else LoggingConfig(progress_bar=False)
        run_dir = self.ctx.out_dir if main else self.ctx.out_dir / f".rank{self.ctx.parallel.rank}"
        return MetricsLogger(lcfg, run_dir, self.total_steps, run_config=to_dict(self.cfg), desc=self.name,
                             resume=bool(self.resumed), start_step=int(self.resumed.get("step", 0)))

    def write_result(self, result: StageResult) -> None:
        """`result.json` in the run directory."""
        (self.ctx.out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")

    # ------------------------------------------------------------------------------------------ throughput
    def flops_metrics(self, train_tokens: int, forward_tokens: int, seconds: float) -> dict[str, float]:
        """Achieved model TFLOP/s (6N per trained token, 2N per forward-only token) and MFU on known cards."""
        if self._num_params is None:
            self._num_params = count_parameters(self.actor.module)
        n = self._num_params
        flops = 6 * n * train_tokens + 2 * n * forward_tokens
        out = {"tflops": flops / max(seconds, 1e-9) / 1e12 / max(self.ctx.parallel.world_size, 1)}
        peak = self.cfg.run.peak_tflops or known_peak(self.ctx.device)
        if peak:
            out["mfu"] = out["tflops"] / peak
        return out


def known_peak(device: torch.device) -> float:
    """The dense bf16 peak TFLOP/s of `device` when it is a card we know, else 0."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def eval_line(when: str, m: dict) -> str:
    """One console line for an evaluation."""
    exact = f" | exact description {m['eval/description_exact']:.3f}" if "eval/description_exact" in m else ""
    return (f"eval {when}: accuracy {m.get('eval/accuracy', float('nan')):.3f} | format {m.get('eval/format', float('nan')):.3f}"
            f" | reward {m.get('eval/reward', float('nan')):.3f}{exact} | n {int(m.get('eval/count', 0))}")
