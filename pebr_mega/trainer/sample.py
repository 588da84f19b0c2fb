"""Difficulty sampling: the warm-up model answers every GRPO question n times (upstream: 8, temperature
1.2, top_p 0.99, images up to 4,194,304 pixels: `examples/pebr_sample.yaml`); each answer is graded for
accuracy (with `rewards.answer_grading`, as the RL stages grade) and written as one JSONL line
`{"qid", "response", "ground_truth", "score"}` that `pebr split` reads. The prompt is `data.format_prompt`.

Grading runs in the reward guard's worker pool (`rewards.timeout_s`, `rewards.num_workers`): an answer whose
grading overruns scores 0 and is counted in the summary (`grading_timeouts`).

Unlike upstream, the output is overwritten (never appended: a re-run would double the count per question
and turn easy questions into medium ones) and every question is sampled, the last partial batch included.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter

from tqdm.auto import tqdm

from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.config import PebrConfig
from pebr_mega.errors import DataError
from pebr_mega.outputs import claim_output_file
from pebr_mega.rewards.model import reward_pool
from pebr_mega.rollout.factory import make_rollout_engine, sampling_params
from pebr_mega.trainer.context import RunContext
from pebr_mega.trainer.evaluate import grade_answers
from pebr_mega.trainer.lifecycle import EngineLifecycle


def run_sampling(cfg: PebrConfig, progress: bool = True) -> dict:
    """Sample `cfg.sample.n` answers per question of `cfg.sample.dataset` with `cfg.sample.model`; returns a summary.

    There is no actor: the engine's weights are the ones it loaded from `sample.model`, valid until its first
    release, so every batch runs inside one rollout phase (which needs no sync).
    """
    sc = cfg.sample
    if not sc.output:
        raise DataError("sample.output is not set: give the rollouts JSONL file to write")
    check_hf_model_dir(sc.model, "sample.model")
    out = claim_output_file(sc.output, [sc.dataset, sc.model], what="sample.output")
    ctx = RunContext.for_generation(cfg, sc.model, "sample", images=dataclasses.replace(cfg.images, max_pixels=sc.max_pixels))
    records = ctx.load_records(sc.dataset, "GRPO")
    requests, report = ctx.requests.build(records, ctx.image_root(sc.dataset))
    if report.skipped:
        print(report.summary())
    pool = reward_pool(cfg.rewards)
    lifecycle = EngineLifecycle(make_rollout_engine(cfg.rollout, sc.model, ctx.device, seed=cfg.run.seed))
    tmp = out.with_name(out.name + ".tmp")
    correct = Counter()
    timeouts = failures = 0
    bar = tqdm(total=len(requests), desc="sample", disable=not progress)
    with tmp.open("w", encoding="utf-8") as f, lifecycle.rollout_phase() as engine:
        for start in range(0, len(requests), sc.batch_size):
            chunk = requests[start:start + sc.batch_size]
            sampling = sampling_params(ctx.tokenizer, sc.n, sc.temperature, sc.top_p, cfg.rollout.max_new_tokens,
                                       seed=cfg.run.seed + start)
            samples = engine.generate(chunk, sampling)
            grades = grade_answers(pool, [(s.response_text, s.request.record.answer) for s in samples],
                                   with_format=False, grading=cfg.rewards.answer_grading)
            timeouts, failures = timeouts + grades.timeouts, failures + grades.failures
            for s, score in zip(samples, grades.accuracy):
                correct[s.record_id] += int(score >= sc.correct_threshold)
                f.write(json.dumps({"qid": s.record_id, "response": s.response_text,
                                    "ground_truth": s.request.record.answer, "score": score}) + "\n")
            bar.update(len(chunk))
    bar.close()
    os.replace(tmp, out)
    hist = Counter(correct[r.record_id] for r in requests)
    summary = {"questions": len(requests), "samples": len(requests) * sc.n, "output": str(out),
               "skipped": dict(report.skipped), "correct_histogram": {str(k): hist[k] for k in sorted(hist)},
               "grading_timeouts": timeouts, "grading_failures": failures}
    print(f"sampled {summary['samples']} answers for {summary['questions']} questions -> {out}; "
          f"correct-of-{sc.n} histogram {summary['correct_histogram']}"
          + (f"; {timeouts} answers timed out in grading (scored 0)" if timeouts else ""))
    return summary
