"""One GRPO stage of the PeBR recipe on the Megatron actor.

A step:
  records --(requests: template + images)--> prompts --(rollout engine, n each)--> samples
  samples --(rewards: the stage preset)--> scores --(algo: group advantages)--> sequences
  sequences --(actor, no grad)--> old log-probs; --(frozen reference)--> reference log-probs
  sequences --(actor: mini-batches x PPO epochs, packed micro-batches, fused GRPO loss)--> new weights
  new weights --(weight sync: TP/PP shards -> HF tensors, buckets)--> rollout engine
and one metrics line. Stage 1 (perception) and stage 2 (reasoning) differ only in data and reward preset.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pebr_mega.actor.megatron_actor import LossSpec
from pebr_mega.actor.packing import ActorSequence
from pebr_mega.algo.grpo import group_advantages
from pebr_mega.logging import log_generations, read_metrics
from pebr_mega.rollout.engine import group_samples
from pebr_mega.rollout.mismatch import token_mult_prob_error
from pebr_mega.rollout.types import Sample
from pebr_mega.trainer.evaluate import generation_rows, to_reward_sample
from pebr_mega.trainer.session import Session


@dataclass
class StageResult:
    """What a stage produced: its final HF model, held-out metrics before/after and the mean reward."""

    model_dir: str
    steps: int
    eval_before: dict = field(default_factory=dict)
    eval_after: dict = field(default_factory=dict)
    mean_reward: float = float("nan")
    first_reward: float = float("nan")
    last_reward: float = float("nan")
    first_loss: float = float("nan")  # SFT: the loss of the first and the last step
    last_loss: float = float("nan")

    def to_dict(self) -> dict:
        """Standard JSON: a number that is not available (NaN) is None (`null`), in nested metrics too."""
        return _finite_or_none(dict(self.__dict__))


class GRPOTrainer:
    """Runs `cfg.grpo` (one stage) from `cfg.grpo.init_model` into `cfg.run.output_dir`."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.stage = cfg.grpo.resolved()
        self.session = Session(cfg, init_model=self.stage.init_model, train_file=self.stage.train_file,
                               eval_file=self.stage.eval_file or cfg.data.eval_file or "", batch_size=self.stage.rollout_batch_size,
                               shuffle=self.stage.shuffle, stage=self.stage.stage)
        s = self.session
        self.updates_per_step = max(1, math.ceil(self.stage.rollout_batch_size / self.stage.mini_batch_size))
        self.total_steps = self._total_steps()
        s.build_actors(total_updates=self.total_steps * self.updates_per_step * self.stage.ppo_epochs,
                       with_reference=cfg.algo.kl_coef > 0, lr=cfg.actor.lr)
        s.build_engine()
        s.build_rewards(cfg.rewards)
        self.step = 0

    def _total_steps(self) -> int:
        """floor(#prompts / rollout batch) x epochs (PEBR_FACTS), at least 1; `max_steps` caps it."""
        per_epoch = max(1, len(self.session.records) // self.stage.rollout_batch_size)
        total = per_epoch * self.stage.epochs
        return min(total, self.stage.max_steps) if self.stage.max_steps > 0 else total

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> StageResult:
        """Run every remaining step (resuming from the newest checkpoint), evaluate, export; returns the result."""
        s = self.session
        self.step = s.maybe_resume()
        logger = s.make_logger(self.total_steps, desc=self.stage.stage)
        result = StageResult(model_dir=str(s.out_dir / "hf"), steps=self.total_steps)
        try:
            result.eval_before = s.load_or_run_eval("eval_before")
            if result.eval_before:
                logger.message(_eval_line("before", result.eval_before))
            while self.step < self.total_steps:
                metrics = self.train_step()
                self.step += 1
                logger.log(self.step, metrics)
                if self.stage.eval_every and self.step % self.stage.eval_every == 0 and self.step < self.total_steps:
                    evaluated = s.run_eval()
                    logger.log(self.step, evaluated, console=False)
                    logger.message(_eval_line(f"at step {self.step}", evaluated))
                if self.stage.save_every and self.step % self.stage.save_every == 0:
                    s.save(self.step)
        except KeyboardInterrupt:
            logger.message(f"interrupted: saving step {self.step} to {s.checkpoints.root}")
            s.save(self.step)
            logger.close()
            raise
        if not s.checkpoints.steps() or s.checkpoints.steps()[-1] != self.step:
            s.save(self.step)
        result.eval_after = s.run_eval()
        if result.eval_after:
            logger.message(_eval_line("after", result.eval_after))
        logger.close()
        s.export(result.model_dir)
        rewards = [r["reward/total"] for r in read_metrics(s.out_dir / "metrics.jsonl") if "reward/total" in r]
        if rewards:
            result.mean_reward = sum(rewards) / len(rewards)
            result.first_reward, result.last_reward = rewards[0], rewards[-1]
        (s.out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        return result

    def train_step(self) -> dict[str, float]:
        """One rollout step and its PPO updates; returns the step's metrics."""
        s, cfg = self.session, self.cfg
        t_step = time.perf_counter()
        metrics: dict[str, float] = {}
        _, records = s.sampler.next_batch()
        requests, report = s.build_requests(records)
        metrics.update(report.metrics())
        sampling = s.sampling(seed=cfg.run.seed * 1_000_003 + self.step)

        t0 = time.perf_counter()
        s.engine.resume_memory()
        samples = s.engine.generate(requests, sampling)
        s.engine.release_memory()
        metrics["time/rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        results = s.reward_model.score([to_reward_sample(x) for x in samples])
        for x, r in zip(samples, results):
            x.reward, x.reward_components = r.total, r.components
        metrics.update(s.reward_summary(results))
        self._assign_advantages(samples, metrics)
        metrics["time/reward"] = time.perf_counter() - t0
        log_generations(cfg.logging, s.out_dir, self.step + 1, generation_rows(samples, s.tokenizer, cfg.logging.log_generations))

        seqs = [_to_sequence(x) for x in samples]
        t0 = time.perf_counter()
        old = s.actor.compute_logprobs(seqs, sampling.temperature)
        for q, (lp, _) in zip(seqs, old):
            q.old_logprobs = lp
        if s.ref_actor is not None:
            for q, (lp, _) in zip(seqs, s.ref_actor.compute_logprobs(seqs, sampling.temperature)):
                q.ref_logprobs = lp
        metrics["time/logprobs"] = time.perf_counter() - t0
        metrics["mismatch/token_mult_prob_error"] = token_mult_prob_error(
            [lp for lp, _ in old], [x.rollout_logprobs for x in samples])

        t0 = time.perf_counter()
        metrics.update(self._update(seqs))
        metrics["time/update"] = time.perf_counter() - t0

        metrics.update(s.sync_engine())
        metrics.update(_length_metrics(samples))
        step_time = time.perf_counter() - t_step
        tokens = sum(len(x.request.prompt_ids) + len(x.response_ids) for x in samples)
        metrics["time/step"] = step_time
        metrics["tokens_per_s"] = tokens / step_time
        metrics.update(s.flops_metrics(train_tokens=tokens * self.stage.ppo_epochs, forward_tokens=tokens *
                                       (2 if s.ref_actor is not None else 1), seconds=step_time))
        return metrics

    def _assign_advantages(self, samples: list[Sample], metrics: dict[str, float]) -> None:
        """Group-normalised advantages: (score - group mean) / (group std + eps), per prompt."""
        groups = list(group_samples(samples))
        ids = torch.tensor([g for g, grp in enumerate(groups) for _ in grp])
        scores = torch.tensor([x.reward for x in samples], dtype=torch.float64)
        adv = group_advantages(scores, ids, norm_by_std=self.cfg.algo.norm_adv_by_std, eps=self.cfg.algo.adv_eps)
        for x, a in zip(samples, adv.tolist()):
            x.advantage = a
        flat = sum(1 for grp in groups if len({round(x.reward, 9) for x in grp}) == 1)
        metrics["advantage/zero_std_groups"] = flat / max(len(groups), 1)
        metrics["advantage/abs_mean"] = float(adv.abs().mean()) if len(adv) else 0.0

    def _update(self, seqs: list[ActorSequence]) -> dict[str, float]:
        """PPO epochs over mini-batches of whole prompt groups; returns the mean of the update metrics."""
        s, cfg = self.session, self.cfg
        n = cfg.rollout.n
        per_update = self.stage.mini_batch_size * n
        loss = LossSpec("grpo", cfg.algo, cfg.rollout.temperature)
        collected: list[dict[str, float]] = []
        for _ in range(self.stage.ppo_epochs):
            for start in range(0, len(seqs), per_update):
                collected.append(s.actor.train_step(seqs[start:start + per_update], loss))
        out = {}
        for k in collected[0]:
            vals = [m[k] for m in collected if k in m and m[k] is not None and math.isfinite(m[k])]
            out[k] = sum(vals) / len(vals) if vals else float("nan")
        out["skipped_updates"] = sum(m.get("skipped", 0.0) for m in collected)
        out.pop("skipped", None)
        if "kl_loss" in out:
            out["kl"] = out["kl_loss"]
        return out


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    return v


def _to_sequence(x: Sample) -> ActorSequence:
    ids = list(x.request.prompt_ids) + list(x.response_ids)
    mask = [0] * len(x.request.prompt_ids) + [1] * len(x.response_ids)
    return ActorSequence(ids, mask, x.request.pixel_values, x.request.image_grid_thw, advantage=x.advantage)


def _length_metrics(samples: list[Sample]) -> dict[str, float]:
    lens = [len(x.response_ids) for x in samples]
    return {"response_length/mean": sum(lens) / max(len(lens), 1), "response_length/max": float(max(lens, default=0)),
            "response_length/clip_ratio": sum(x.finish_reason == "length" for x in samples) / max(len(samples), 1)}


def _eval_line(when: str, m: dict) -> str:
    exact = f" | exact description {m['eval/description_exact']:.3f}" if "eval/description_exact" in m else ""
    return (f"eval {when}: accuracy {m.get('eval/accuracy', float('nan')):.3f} | format {m.get('eval/format', float('nan')):.3f}"
            f" | reward {m.get('eval/reward', float('nan')):.3f}{exact} | n {int(m.get('eval/count', 0))}")
