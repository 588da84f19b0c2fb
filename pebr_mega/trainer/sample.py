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
from collections import Counter
from contextlib import nullcontext
from itertools import islice
from pathlib import Path
from typing import Iterator, TypeVar

from tqdm.auto import tqdm

from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.config import PebrConfig
from pebr_mega.errors import DataError
from pebr_mega.outputs import atomic_text_file, claim_output_file
from pebr_mega.parallel.groups import barrier, broadcast_from_main, is_main_rank
from pebr_mega.rewards.model import reward_pool
from pebr_mega.rollout.factory import make_rollout_engine, sampling_params
from pebr_mega.rollout.requests import RequestReport
from pebr_mega.trainer.context import RunContext
from pebr_mega.trainer.evaluate import grade_answers
from pebr_mega.trainer.lifecycle import EngineLifecycle

T = TypeVar("T")


def run_sampling(cfg: PebrConfig, progress: bool = True) -> dict:
    """Sample `cfg.sample.n` answers per question of `cfg.sample.dataset` with `cfg.sample.model`; returns a summary.

    There is no actor: the engine's weights are the ones it loaded from `sample.model`, valid until its first
    release, so every batch runs inside one rollout phase (which needs no sync). Requests (with their pixel
    values, large at the 4,194,304-pixel cap) are built a batch at a time and dropped after it: the batches,
    their seeds and the output are those of building every request first and cutting the list into
    `sample.batch_size` pieces; the skip report is complete at the end.

    Under torchrun (or inside the pipeline's job) every rank builds the same requests and calls the engine
    (SGLang's engine shares each batch among its rollout groups and gathers the answers on every rank; the HF
    engine answers the whole batch on each rank); rank 0 alone grades, writes the file and replaces it, and
    the summary is rank 0's on every rank. The engine is shut down at the end, also on error.
    """
    sc = cfg.sample
    if not sc.output:
        raise DataError("sample.output is not set: give the rollouts JSONL file to write")
    check_hf_model_dir(sc.model, "sample.model")
    writer = is_main_rank()
    out = claim_output_file(sc.output, [sc.dataset, sc.model], what="sample.output") if writer else None
    ctx = RunContext.for_generation(cfg, sc.model, "sample", images=dataclasses.replace(cfg.images, max_pixels=sc.max_pixels))
    records = ctx.load_records(sc.dataset, "GRPO")
    lifecycle = EngineLifecycle(make_rollout_engine(cfg.rollout, sc.model, ctx.device, seed=cfg.run.seed))
    try:
        summary = _sample_all(cfg, ctx, lifecycle, records, out, progress and writer)
    finally:
        lifecycle.close()
    summary = broadcast_from_main(summary)
    barrier()  # the file is in place before any rank goes on (the pipeline's split reads it next)
    return summary


def _sample_all(cfg: PebrConfig, ctx: RunContext, lifecycle: EngineLifecycle, records: list, out: Path | None,
                progress: bool) -> dict | None:
    """Every batch through one rollout phase; with `out` (the writer) graded and written to `out`, returning the
    summary; without it (another rank) only the engine calls, returning None."""
    sc = cfg.sample
    report = RequestReport()
    pool = reward_pool(cfg.rewards) if out is not None else None
    correct: Counter = Counter()
    sampled: list[str] = []  # the qids of the questions sampled, in order
    timeouts = failures = 0
    bar = tqdm(total=len(records), desc="sample", disable=not progress)
    requests = ctx.requests.iter_build(records, ctx.image_root(sc.dataset), report)
    with (atomic_text_file(out) if out is not None else nullcontext()) as f, \
            lifecycle.rollout_phase() as engine:
        for chunk in _batches(requests, sc.batch_size):
            start = len(sampled)  # the chunk's offset in the list of every request: its seed, as before
            sampled += [r.record_id for r in chunk]
            t, fl = _sample_batch(cfg, ctx, engine, pool, chunk, cfg.run.seed + start, f, correct)
            timeouts, failures = timeouts + t, failures + fl
            del chunk  # this batch's pixel values go before the next batch is built
            bar.update(report.built + sum(report.skipped.values()) - bar.n)
    bar.update(len(records) - bar.n)
    bar.close()
    if out is None:
        return None
    if report.skipped:
        print(report.summary())
    hist = Counter(correct[q] for q in sampled)
    summary = {"questions": len(sampled), "samples": len(sampled) * sc.n, "output": str(out),
               "skipped": dict(report.skipped), "correct_histogram": {str(k): hist[k] for k in sorted(hist)},
               "grading_timeouts": timeouts, "grading_failures": failures}
    print(f"sampled {summary['samples']} answers for {summary['questions']} questions -> {out}; "
          f"correct-of-{sc.n} histogram {summary['correct_histogram']}"
          + (f"; {timeouts} answers timed out in grading (scored 0)" if timeouts else ""))
    return summary


def _sample_batch(cfg: PebrConfig, ctx: RunContext, engine, pool, chunk: list, seed: int, f,
                  correct: Counter) -> tuple[int, int]:
    """Answer one batch of requests; the writer (`f` set) grades them and writes their lines to `f`. Returns
    (grading timeouts, failures). Everything that holds the batch's requests is local here and gone when it
    returns."""
    sc = cfg.sample
    sampling = sampling_params(ctx.tokenizer, sc.n, sc.temperature, sc.top_p, cfg.rollout.max_new_tokens, seed=seed)
    samples = engine.generate(chunk, sampling)  # on every rank: a collective for the SGLang engine
    if f is None:
        return 0, 0
    grades = grade_answers(pool, [(s.response_text, s.request.record.answer) for s in samples],
                           with_format=False, grading=cfg.rewards.answer_grading)
    for s, score in zip(samples, grades.accuracy):
        correct[s.record_id] += int(score >= sc.correct_threshold)
        f.write(json.dumps({"qid": s.record_id, "response": s.response_text,
                            "ground_truth": s.request.record.answer, "score": score}) + "\n")
    return grades.timeouts, grades.failures


def _batches(items: Iterator[T], size: int) -> Iterator[list[T]]:
    """Successive lists of `size` items (the last one shorter), taken from `items` only as each is needed; a
    list is not referenced here once it has been handed out."""
    while True:
        chunk = list(islice(items, size))
        if not chunk:
            return
        yield chunk
        del chunk
