"""One GRPO stage of the PeBR recipe on the Megatron actor.

A step:
  records --(requests: template + images)--> prompts --(rollout engine, n each)--> samples
  samples --(rewards: the stage preset)--> scores --(algo: group advantages)--> sequences
  sequences --(actor, no grad)--> old log-probs (on policy: the update's own); --(frozen reference)--> reference log-probs
  sequences --(actor: mini-batches x PPO epochs, packed micro-batches, fused GRPO loss)--> new weights
and one metrics line. The new weights reach the engine at the start of the next rollout phase (weight sync:
TP/PP shards -> HF tensors -> buckets; `pebr_mega.trainer.lifecycle`). Stage 1 (perception) and stage 2 (reasoning) differ only in data and reward preset.
"""
from __future__ import annotations

import math
import time

import torch

from pebr_mega.actor.megatron_actor import LossSpec
from pebr_mega.actor.packing import ActorSequence
from pebr_mega.algo.grpo import group_advantages
from pebr_mega.config import PebrConfig
from pebr_mega.logging import log_generations
from pebr_mega.rewards import build_reward, summarize
from pebr_mega.rollout.engine import group_samples
from pebr_mega.rollout.factory import rollout_sampling
from pebr_mega.algo.mismatch import token_mult_prob_error
from pebr_mega.rollout.types import Sample
from pebr_mega.run.run_dir import RunSpec
from pebr_mega.trainer.data_order import EpochSampler
from pebr_mega.trainer.evaluate import Evaluator, generation_rows, to_reward_sample
from pebr_mega.trainer.stage import StageResult, StageTrainer
from pebr_mega.trainer.stage_data import RLSchedule, load_stage_records


class GRPOTrainer(StageTrainer):
    """Runs `cfg.grpo` (one stage) from `cfg.grpo.init_model` into `cfg.run.output_dir`."""

    def __init__(self, cfg: PebrConfig, restart: bool = False, eval_before: dict | None = None) -> None:
        self.grpo = cfg.grpo  # the stage's own section (grpo.*)
        super().__init__(cfg, self.grpo, RunSpec.grpo(cfg), restart=restart, eval_before=eval_before)
        # Filtered before batching, then batched with the last partial batch dropped (trainer/stage_data.py).
        self.data = load_stage_records(cfg, self.grpo, self.ctx.requests, log=self.ctx.log)
        self.records = self.data.train
        self.schedule = RLSchedule.of(cfg, self.grpo, len(self.records))
        self.schedule.require_steps(self.grpo, len(self.data.holdout))
        self.sampler = EpochSampler(self.records, self.grpo.rollout_batch_size, seed=cfg.run.seed,
                                    shuffle=self.grpo.shuffle, drop_last=True)
        self.total_steps = self.schedule.total_steps
        # One update per step (one mini-batch, one PPO epoch): the policy that sampled is the one updated, and
        # the update's own forward gives the old log-probs (detached) instead of a separate pass over the batch.
        self.on_policy = self.schedule.updates_per_step == 1
        self.ctx.log(self.schedule.summary(self.grpo.stage, len(self.data.holdout)))
        self.build_engine()  # first: SGLang sizes its KV pool from the free memory (see trainer/stage.py)
        self.actor = self.build_actor(cfg.actor, self.total_steps * self.schedule.updates_per_step)
        self.ref_actor = self.build_actor(cfg.actor, 1, trainable=False) if cfg.algo.kl_coef > 0 else None
        self.reward_model = build_reward(cfg.rewards, self.grpo.stage)  # grpo.stage picks the preset
        self.evaluator = (self.build_evaluator(self.reward_model) if not self.data.holdout else
                          Evaluator.of_records(self.ctx, self.lifecycle, self.data.holdout, self.grpo.train_file,
                                               self.loop.eval_max_samples, self.reward_model))

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, float]:
        """One rollout step and its PPO updates; returns the step's metrics."""
        t_step = time.perf_counter()
        metrics: dict[str, float] = {"skipped_batches": 0.0}
        samples = self.rollout(metrics)
        if not samples:  # no request of the batch could be built: the step trains nothing, and says so
            metrics["skipped_batches"] = 1.0
            self.ctx.log(f"{self.name} step {self.step + 1}: no request of the batch could be built "
                         f"({', '.join(f'{k} {v:g}' for k, v in metrics.items() if k.startswith('requests/skipped_'))}); "
                         "the step is skipped")
            return metrics
        self.score(samples, metrics)
        seqs = self.logprobs(samples, metrics)
        t0 = time.perf_counter()
        metrics.update(self._update(seqs))
        metrics["time/update"] = time.perf_counter() - t0
        metrics.update(_length_metrics(samples))
        step_time = time.perf_counter() - t_step
        tokens = sum(len(x.request.prompt_ids) + len(x.response_ids) for x in samples)
        metrics["time/step"] = step_time
        metrics["tokens_per_s"] = tokens / step_time
        forward_passes = (0 if self.on_policy else 1) + (1 if self.ref_actor is not None else 0)
        metrics.update(self.flops_metrics(train_tokens=tokens * self.grpo.ppo_epochs, forward_tokens=tokens *
                                          forward_passes, seconds=step_time))
        return metrics

    def rollout(self, metrics: dict[str, float]) -> list[Sample]:
        """The next batch's requests, answered n times each by the engine (synced from the actor first)."""
        epoch, records = self.sampler.next_batch()
        requests, report = self.ctx.requests.build(records, self.ctx.image_root(self.grpo.train_file))
        metrics.update(report.metrics())
        metrics["epoch"] = epoch
        if not requests:  # every record failed to build (the screen reads headers only: pixels can still fail)
            return []
        sampling = rollout_sampling(self.cfg.rollout, self.ctx.tokenizer, seed=self.cfg.run.seed * 1_000_003 + self.step)
        with self.lifecycle.rollout_phase() as engine:
            t0 = time.perf_counter()
            samples = engine.generate(requests, sampling)
            metrics["time/rollout"] = time.perf_counter() - t0
        metrics.update(self.lifecycle.last_sync)
        return samples

    def score(self, samples: list[Sample], metrics: dict[str, float]) -> None:
        """The stage preset's rewards, then the group advantages."""
        t0 = time.perf_counter()
        results = self.reward_model.score([to_reward_sample(x) for x in samples])
        for x, r in zip(samples, results):
            x.reward, x.reward_components = r.total, r.components
        metrics.update(summarize(results))
        self._assign_advantages(samples, metrics)
        metrics["time/reward"] = time.perf_counter() - t0
        log_generations(self.cfg.logging, self.ctx.out_dir, self.step + 1,
                        generation_rows(samples, self.ctx.tokenizer, self.cfg.logging.log_generations))

    def logprobs(self, samples: list[Sample], metrics: dict[str, float]) -> list[ActorSequence]:
        """The actor's (old) and the reference's log-probs of every sample; the train-inference mismatch.

        On policy the old log-probs and the mismatch come from the update's forward instead (`self.on_policy`).
        """
        seqs = [_to_sequence(x) for x in samples]
        temperature = self.cfg.rollout.temperature
        t0 = time.perf_counter()
        if self.on_policy:
            for q, x in zip(seqs, samples):
                q.rollout_logprobs = None if x.rollout_logprobs is None else torch.as_tensor(x.rollout_logprobs)
        else:
            old = self.actor.compute_logprobs(seqs, temperature)
            for q, (lp, _) in zip(seqs, old):
                q.old_logprobs = lp
            metrics["mismatch/token_mult_prob_error"] = token_mult_prob_error(
                [lp for lp, _ in old], [x.rollout_logprobs for x in samples])
        if self.ref_actor is not None:
            for q, (lp, _) in zip(seqs, self.ref_actor.compute_logprobs(seqs, temperature)):
                q.ref_logprobs = lp
        metrics["time/logprobs"] = time.perf_counter() - t0
        return seqs

    def summarize(self, result: StageResult, rows: list[dict]) -> None:
        """The mean, first and last training reward."""
        # A reward that was not finite is written as null: a stage may have none that is (every update skipped).
        rewards = [r["reward/total"] for r in rows if isinstance(r.get("reward/total"), (int, float))
                   and math.isfinite(r["reward/total"])]
        if rewards:
            result.mean_reward = sum(rewards) / len(rewards)
            result.first_reward, result.last_reward = rewards[0], rewards[-1]

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
        cfg = self.cfg
        n = cfg.rollout.n
        per_update = self.grpo.mini_batch_size * n
        loss = LossSpec("grpo", cfg.algo, cfg.rollout.temperature, on_policy=self.on_policy)
        collected: list[dict[str, float]] = []
        for _ in range(self.grpo.ppo_epochs):
            for start in range(0, len(seqs), per_update):
                collected.append(self.actor.train_step(seqs[start:start + per_update], loss))
        out = {}
        for k in collected[0]:
            vals = [m[k] for m in collected if k in m and m[k] is not None and math.isfinite(m[k])]
            out[k] = sum(vals) / len(vals) if vals else float("nan")
        out["skipped_updates"] = sum(m.get("skipped", 0.0) for m in collected)
        out.pop("skipped", None)
        if "kl_loss" in out:
            out["kl"] = out["kl_loss"]
        return out


def _to_sequence(x: Sample) -> ActorSequence:
    ids = list(x.request.prompt_ids) + list(x.response_ids)
    mask = [0] * len(x.request.prompt_ids) + [1] * len(x.response_ids)
    return ActorSequence(ids, mask, x.request.pixel_values, x.request.image_grid_thw, advantage=x.advantage)


def _length_metrics(samples: list[Sample]) -> dict[str, float]:
    lens = [len(x.response_ids) for x in samples]
    return {"response_length/mean": sum(lens) / max(len(lens), 1), "response_length/max": float(max(lens, default=0)),
            "response_length/clip_ratio": sum(x.finish_reason == "length" for x in samples) / max(len(samples), 1)}
