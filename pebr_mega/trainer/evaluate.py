"""Held-out evaluation: generate one answer per question and grade it (accuracy, format, reward).

`evaluate` is used by `pebr eval` and the demo's summary; `Evaluator` by the trainers before, during and
after a stage, through the engine's rollout phase (`pebr_mega.trainer.lifecycle`). Grading goes through the
reward guard's worker pool (`pebr_mega.rewards.guard`): an answer whose grading overruns the time limit
scores 0 and is counted (`eval/timeouts`).
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass
from typing import Sequence

from tqdm.auto import tqdm

from pebr_mega.data.records import GRPORecord
from pebr_mega.parallel.groups import is_main_rank
from pebr_mega.rewards import RewardModel, RewardSample, accuracy_reward, format_reward
from pebr_mega.rewards.guard import RewardPool, score_components
from pebr_mega.rewards.model import RewardConfig, reward_pool
from pebr_mega.rewards.perception import description_attributes, description_metrics, description_scores
from pebr_mega.rollout.engine import RolloutEngine
from pebr_mega.rollout.factory import rollout_sampling
from pebr_mega.rollout.types import RolloutRequest, Sample, SamplingParams
from pebr_mega.trainer.context import RunContext
from pebr_mega.trainer.lifecycle import EngineLifecycle


def to_reward_sample(s: Sample) -> RewardSample:
    """What the reward functions need from a rollout sample."""
    rec = s.request.record
    return RewardSample(response=s.response_text, response_tokens=len(s.response_ids),
                        answer=getattr(rec, "answer", ""), key_words=list(getattr(rec, "key_words", []) or []),
                        images=list(s.request.images), qid=s.record_id)


@dataclass
class Grades:
    """Accuracy and format (0 or 1) of each answer; `timeouts` counts the answers whose grading overran, and
    `failures` those whose grader raised (both scored 0)."""

    accuracy: list[float]
    format: list[float]
    timeouts: int = 0
    failures: int = 0


def grade_answers(pool: RewardPool, answers: Sequence[tuple[str, str]], with_format: bool = True,
                  grading: str = "upstream") -> Grades:
    """Grade `(response text, ground truth)` pairs with the accuracy (as `grading`: `rewards.answer_grading`)
    and format rewards, under the pool's time limit."""
    def components(text: str, truth: str) -> list:
        comps = [("accuracy", accuracy_reward, (text, truth, grading))]
        return comps + [("format", format_reward, (text,))] if with_format else comps

    graded = score_components(pool, [components(t, a) for t, a in answers])
    return Grades(accuracy=[float(g.values.get("accuracy", 0.0)) for g in graded],
                  format=[float(g.values.get("format", 0.0)) for g in graded],
                  timeouts=sum(g.timed_out for g in graded), failures=sum(bool(g.failed) for g in graded))


def generation_rows(samples: Sequence[Sample], tokenizer, n: int) -> list[dict]:
    """`n` samples spread evenly over the batch (so over prompt groups) as rows for `log_generations`: the
    prompt as text (special tokens and image pads dropped), the response, its reward and the answer."""
    if n <= 0 or not samples:
        return []
    picked = [samples[i * len(samples) // min(n, len(samples))] for i in range(min(n, len(samples)))]
    return [{"qid": s.record_id, "prompt": tokenizer.decode(s.request.prompt_ids, skip_special_tokens=True),
             "response": s.response_text, "reward": s.reward, "answer": getattr(s.request.record, "answer", ""),
             "components": dict(s.reward_components)} for s in picked]


def evaluate(engine: RolloutEngine, requests: Sequence[RolloutRequest], sampling: SamplingParams,
             reward_model: RewardModel | None = None, batch_size: int = 32, progress: bool = True,
             results_path: str | Path | None = None, grading: str = "upstream",
             pool: RewardPool | None = None) -> dict[str, float]:
    """Accuracy (graded as `grading`: `rewards.answer_grading`), format rate, mean response length (and mean
    stage reward when a reward model is given).

    Keys: `eval/accuracy`, `eval/format`, `eval/response_length`, `eval/count`, `eval/timeouts`, `eval/reward`,
    and `eval/description_exact` / `eval/description_f1` when the records carry a reference `description`.
    Grading uses `pool`, else the reward model's, else the default `RewardConfig`'s.
    """
    samples: list[Sample] = []
    bar = tqdm(total=len(requests), desc="eval", disable=not progress, leave=False)
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        samples.extend(engine.generate(chunk, sampling))
        bar.update(len(chunk))
    bar.close()
    if pool is None:
        pool = reward_model.pool if reward_model is not None else reward_pool(RewardConfig())
    grades = grade_answers(pool, [(s.response_text, getattr(s.request.record, "answer", "")) for s in samples],
                           grading=grading)
    acc, fmt = grades.accuracy, grades.format
    n = max(len(samples), 1)
    out = {
        "eval/count": float(len(samples)),
        "eval/timeouts": float(grades.timeouts),
        "eval/accuracy": sum(acc) / n,
        "eval/format": sum(fmt) / n,
        "eval/response_length": sum(len(s.response_ids) for s in samples) / n,
    }
    refs = [(getattr(s.request.record, "extra", None) or {}).get("description") for s in samples]
    out.update(description_metrics([s.response_text for s in samples], refs))
    if reward_model is not None and samples:
        results = reward_model.score([to_reward_sample(s) for s in samples])
        out["eval/reward"] = sum(r.total for r in results) / len(results)
    if results_path is not None:
        with Path(results_path).open("w", encoding="utf-8") as f:
            for s, a, fm, ref in zip(samples, acc, fmt, refs):
                row = {"qid": s.record_id, "response": s.response_text,
                       "ground_truth": getattr(s.request.record, "answer", ""), "accuracy": a, "format": fm}
                if ref is not None:
                    row["description_exact"] = description_scores(s.response_text, ref)[0]
                    attributes = description_attributes(s.response_text, ref)
                    row["description_count_color_exact"] = attributes["count_color_exact"]
                    row["description_omission"] = attributes["omission"]
                f.write(json.dumps(row) + "\n")
    return out


class Evaluator:
    """A stage's held-out evaluation: its requests are built once; every run is one rollout phase with the
    validation sampling (`rollout.val_*`) and the stage's reward preset."""

    def __init__(self, ctx: RunContext, lifecycle: EngineLifecycle, eval_file: str, max_samples: int,
                 reward_model: RewardModel | None, records: Sequence[GRPORecord] | None = None) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle
        self.eval_file = eval_file  # where the records come from (their images resolve against its folder)
        self.reward_model = reward_model
        records = list(records) if records is not None else ctx.load_records(eval_file, "eval")
        self.records = records[:max_samples] if max_samples else records
        self._requests: list[RolloutRequest] | None = None

    @classmethod
    def of_records(cls, ctx: RunContext, lifecycle: EngineLifecycle, records: Sequence[GRPORecord], data_file: str,
                   max_samples: int, reward_model: RewardModel | None) -> "Evaluator":
        """An evaluation of `records` read from `data_file` (a stage's held-out slice, `grpo.eval_holdout`)."""
        return cls(ctx, lifecycle, data_file, max_samples, reward_model, records=records)

    def requests(self) -> list[RolloutRequest]:
        """The eval set's requests (built on first use; skipped records reported once)."""
        if self._requests is None:
            self._requests, report = self.ctx.requests.build(self.records, self.ctx.image_root(self.eval_file))
            if report.skipped:
                self.ctx.log(f"{self.ctx.stage} eval: {report.summary()}")
        return self._requests

    def run(self, results_path: str | Path | None = None) -> dict[str, float]:
        """Accuracy / format / reward of the engine's current policy (synced from the actor by the phase); one
        row per question in `results_path` when given (`evaluate`)."""
        cfg = self.ctx.cfg
        requests = self.requests()
        sampling = rollout_sampling(cfg.rollout, self.ctx.tokenizer, seed=cfg.run.seed, validation=True)
        with self.lifecycle.rollout_phase() as engine:
            return evaluate(engine, requests, sampling, reward_model=self.reward_model,
                            batch_size=cfg.rollout.batch_size, progress=is_main_rank() and cfg.logging.progress_bar,
                            grading=cfg.rewards.answer_grading, results_path=results_path)
