"""Held-out evaluation: generate one answer per question and grade it (accuracy, format, reward).

`evaluate_model` is `pebr eval` (an exported model on a dataset file, with its console line); `evaluate`, the
measurement itself, serves it and the demo's summary; `Evaluator` serves the trainers before, during and
after a stage, through the engine's rollout phase (`pebr_mega.trainer.lifecycle`). Grading goes through the
reward guard's worker pool (`pebr_mega.rewards.guard`): an answer whose grading overruns the time limit
scores 0 and is counted (`eval/timeouts`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from tqdm.auto import tqdm

from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.data.records import GRPORecord, image_root_for, load_grpo_records
from pebr_mega.errors import DataError
from pebr_mega.outputs import claim_output_file
from pebr_mega.parallel.groups import is_main_rank
from pebr_mega.rewards import RewardModel, RewardSample, accuracy_reward, format_reward
from pebr_mega.rewards.guard import RewardPool, score_components
from pebr_mega.rewards.model import RewardConfig, reward_pool
from pebr_mega.rewards.perception import description_attributes, description_metrics, description_scores
from pebr_mega.rollout.engine import RolloutEngine
from pebr_mega.rollout.factory import rollout_sampling, sampling_params
from pebr_mega.rollout.hf_engine import HFRolloutEngine
from pebr_mega.rollout.inference import model_request_builder
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
                    row["description_extra"] = attributes["extra"]
                f.write(json.dumps(row) + "\n")
    return out


@dataclass(frozen=True)
class ModelEvaluation:
    """What `pebr eval` measured (`evaluate`'s metrics) and how: the model, the dataset, the generation length
    cap and the grading."""

    model: str
    dataset: str
    metrics: dict[str, float]
    max_new_tokens: int
    grading: str

    def line(self) -> str:
        """The one console line of `pebr eval`."""
        m = self.metrics
        return (f"eval {self.model} on {self.dataset}: {int(m['eval/count'])} questions | accuracy "
                f"{m['eval/accuracy']:.3f} | format {m['eval/format']:.3f} | mean length "
                f"{m['eval/response_length']:.0f} tokens (at most {self.max_new_tokens}, graded {self.grading})"
                + (f" | exact description {m['eval/description_exact']:.3f}" if "eval/description_exact" in m else "")
                + (f" | {int(m['eval/timeouts'])} timed out in grading (scored 0)" if m.get("eval/timeouts") else ""))


def evaluate_model(model: str, dataset: str, max_new_tokens: int, grading: str = "upstream", *,
                   image_root: str | None = None, max_samples: int = 0, temperature: float = 0.0,
                   batch_size: int = 16, results_path: str | None = None, seed: int = 0,
                   format_prompt: str | None = None, verify: bool = True, allow_images_outside_root: bool = False,
                   log: Callable[[str], None] = print) -> ModelEvaluation:
    """`pebr eval`: one answer per question of the GRPO-format `dataset` (its first `max_samples`, 0 = all) from
    the HF model directory `model` (`--model`), prompted as the model was trained (`rollout.inference`), graded
    as `grading`; one JSON line per question to `results_path` (`--results`) when given. Every check comes before
    the model loads: the directory (its weights against its manifest with `verify`), the results file (never an
    input), the records; what is skipped is logged. DataError when nothing is left to evaluate."""
    check_hf_model_dir(model, "--model", verify=verify)
    if results_path:
        claim_output_file(results_path, [dataset, model], what="--results")
    loaded = load_grpo_records(dataset, image_root, allow_outside_root=allow_images_outside_root)
    if loaded.skipped:
        log(loaded.report())
    records = loaded.records[: max_samples or None]
    if not records:
        raise DataError(f"{dataset}: no usable records to evaluate ({loaded.total} read, "
                        f"{len(loaded.skipped)} skipped)")
    engine = HFRolloutEngine.from_pretrained(model, batch_size=batch_size)
    builder = model_request_builder(model, engine.tokenizer, format_prompt)
    requests, report = builder.build(records, image_root_for(dataset, image_root))
    if report.skipped:
        log(report.summary())
    if not requests:
        raise DataError(f"{dataset}: none of its {len(records)} records could be turned into a prompt")
    sampling = sampling_params(engine.tokenizer, 1, temperature, 1.0, max_new_tokens, seed)
    metrics = evaluate(engine, requests, sampling, batch_size=batch_size, results_path=results_path, grading=grading)
    return ModelEvaluation(model, dataset, metrics, max_new_tokens, grading)


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
