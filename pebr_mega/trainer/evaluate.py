"""Held-out evaluation: generate one answer per question and grade it (accuracy, format, reward).

Used by `pebr eval`, by the trainers before and after a stage, and by the demo's summary.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pebr_mega.rewards import RewardModel, RewardSample, accuracy_reward, format_reward
from pebr_mega.rewards.perception import description_metrics, description_scores
from pebr_mega.rollout.engine import RolloutEngine
from pebr_mega.rollout.types import RolloutRequest, Sample, SamplingParams


def to_reward_sample(s: Sample) -> RewardSample:
    """What the reward functions need from a rollout sample."""
    rec = s.request.record
    return RewardSample(response=s.response_text, response_tokens=len(s.response_ids),
                        answer=getattr(rec, "answer", ""), key_words=list(getattr(rec, "key_words", []) or []),
                        images=list(s.request.images), qid=s.record_id)


def evaluate(engine: RolloutEngine, requests: Sequence[RolloutRequest], sampling: SamplingParams,
             reward_model: RewardModel | None = None, batch_size: int = 32, progress: bool = True,
             results_path: str | Path | None = None) -> dict[str, float]:
    """Accuracy, format rate, mean response length (and mean stage reward when a reward model is given).

    Keys: `eval/accuracy`, `eval/format`, `eval/response_length`, `eval/count`, `eval/reward`, and
    `eval/description_exact` / `eval/description_f1` when the records carry a reference `description`.
    """
    from tqdm.auto import tqdm

    samples: list[Sample] = []
    bar = tqdm(total=len(requests), desc="eval", disable=not progress, leave=False)
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        samples.extend(engine.generate(chunk, sampling))
        bar.update(len(chunk))
    bar.close()
    acc = [accuracy_reward(s.response_text, getattr(s.request.record, "answer", "")) for s in samples]
    fmt = [format_reward(s.response_text) for s in samples]
    n = max(len(samples), 1)
    out = {
        "eval/count": float(len(samples)),
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
                f.write(json.dumps(row) + "\n")
    return out
