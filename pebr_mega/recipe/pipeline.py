"""The whole recipe as one command: sft -> sample -> split -> stage 1 -> stage 2 -> export.

Every stage writes into `pipeline.work_dir/<stage>/`: a `STARTED` file when it starts and, when it has
finished, a `DONE` file holding its result; both carry the stage's fingerprint (`stage_fingerprints`: the
settings that define its result, `pebr_mega.run.fingerprint`, plus the digest of the stage before it)
and are written atomically. A re-run skips the stages that are done and resumes an interrupted one from its
newest checkpoint (the trainers resume by themselves). A stage recorded with other settings than the
re-run's stops the re-run before anything loads, with one line naming the first such stage and the keys
that differ; with `restart` (`--force-restart`) that stage and every stage after it are discarded and run
again, and the stages before it stay done. What each stage does when its turn comes (run, skip, or find
it done) and the config it runs with are `recipe/work_dir.py`'s answer, the one `--dry-run` reports. Each
stage starts from the previous one's HF directory:

    sft/hf  --sample-->  sample/rollouts.jsonl  --split-->  split/{easy,medium,hard}case.json
    stage1 (easy, from sft/hf) -> stage1/hf;  stage2 (medium, from stage1/hf) -> stage2/hf -> final/

(`pipeline.stage1_data=grpo` gives stage 1 every question of `pipeline.grpo_file` instead of the easy split,
and `pipeline.stage1_max_steps` its own step limit: the demo's departures, docs/DEMO.md.)

Upstream's code trains on the easy and the medium questions and leaves the hard ones unused; here they are
written out too (`split/hardcase.json`), for a user who wants them in the SFT set of a next round.
"""
from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from pebr_mega.checkpoint.hf_io import atomic_dir, verify_hf_weights
from pebr_mega.config import PebrConfig
from pebr_mega.data.split import format_summary, split_files
from pebr_mega.errors import DataError
from pebr_mega.outputs import claim_output_dir, lock_output_dir, write_text_atomic
from pebr_mega.parallel.groups import is_main_rank
from pebr_mega.recipe.work_dir import (STAGES, StagePlan, WorkDir, check_pipeline_config, done_file, find_mismatch,
                                       plan_stage, stage_fingerprints, started_file)
from pebr_mega.run.fingerprint import fingerprint_record
from pebr_mega.trainer.grpo import GRPOTrainer
from pebr_mega.trainer.lifecycle import free_allocator_cache
from pebr_mega.trainer.sample import run_sampling
from pebr_mega.trainer.sft import SFTTrainer
from pebr_mega.trainer.stage import eval_set_of

def check_recorded_stages(work: Path, plan: dict[str, dict], restart: bool, log: Callable[[str], None]) -> None:
    """Compare each stage's recorded fingerprint with `plan` (`work_dir.find_mismatch`, as `--dry-run` does); at
    the first that differs, raise `SettingsMismatchError` naming the keys, or with `restart` discard it and every
    later stage."""
    mismatch = find_mismatch(work, plan)
    if mismatch is None:
        return
    if not restart:
        raise mismatch.error()
    log(f"[pipeline] {mismatch.restart_note()}")
    for folder in mismatch.folders():
        shutil.rmtree(folder, ignore_errors=True)


def _mark_started(work: Path, stage: str, settings: dict) -> None:
    claim_output_dir(work / stage, what="pipeline stage folder")
    write_text_atomic(started_file(work, stage),
                      json.dumps({"fingerprint": fingerprint_record(stage, settings)}, indent=1) + "\n")


def _mark_done(work: Path, stage: str, result: dict, settings: dict) -> dict:
    done_file(work, stage).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(done_file(work, stage), json.dumps(
        {"result": result, "fingerprint": fingerprint_record(stage, settings)}, indent=2, default=str) + "\n")
    return result


def run_pipeline(cfg: PebrConfig, log: Callable[[str], None] = print, restart: bool = False) -> dict[str, dict]:
    """Run the stages listed in `cfg.pipeline.stages` in order; returns each stage's result. `restart`
    discards the stages recorded with other settings (and the stages after them) instead of stopping. What
    each stage does is `work_dir.plan_stage`'s answer when its turn comes, as `--dry-run` reports it."""
    p = cfg.pipeline
    check_pipeline_config(p)
    work = claim_output_dir(p.work_dir, [p.base_model, p.sft_file, p.grpo_file, p.eval_file],
                            what="pipeline.work_dir", writes=[*STAGES, "final"])
    if is_main_rank():  # one process per job holds it (a job's ranks are processes)
        lock_output_dir(work, "pipeline.work_dir")
    fingerprints = stage_fingerprints(cfg, work)
    check_recorded_stages(work, fingerprints, restart, log)
    found = WorkDir(work)  # the discarded folders are gone: the stages find the directory as it is
    results: dict[str, dict] = {}
    for stage in STAGES:
        if stage not in p.stages:
            continue
        plan = plan_stage(cfg, found, stage, results)
        if plan.status == "done":
            log(f"[pipeline] {stage}: already done, skipping")
            results[stage] = plan.result
            continue
        if plan.error is not None:  # worded as the dry run's `plan_error` words it
            raise DataError(f"{stage}: {plan.error}")
        log(f"[pipeline] {stage}: starting")
        _mark_started(work, stage, fingerprints[stage])
        t0 = time.time()
        res = _run_stage(cfg, work, plan, results)
        # The stage's engine is shut down (EngineLifecycle.close); its actor is garbage now: collect it and give
        # its cached blocks back before the next stage sizes its engine's KV pool from the free memory.
        gc.collect()
        free_allocator_cache()
        res["seconds"] = round(time.time() - t0, 1)
        results[stage] = _mark_done(work, stage, res, fingerprints[stage])
        log(f"[pipeline] {stage}: done in {res['seconds']:.0f}s")
    return results


def _run_stage(cfg: PebrConfig, work: Path, plan: StagePlan, results: dict[str, dict]) -> dict:
    """Run one stage as `plan` says (a skipped GRPO stage only records that it passes its model on)."""
    if plan.status not in ("to run", "skipped"):
        raise RuntimeError(f"pipeline stage {plan.stage} is {plan.status!r} when its turn comes")  # pending: a bug
    return _RUNNERS[plan.stage](cfg, work, plan, results)


# One function per stage: tools/profile_demo.py files the demo's time by these names on the stack.
def _run_sft(cfg: PebrConfig, work: Path, plan: StagePlan, results: dict[str, dict]) -> dict:
    return SFTTrainer(plan.config).train().to_dict()


def _run_sample(cfg: PebrConfig, work: Path, plan: StagePlan, results: dict[str, dict]) -> dict:
    return run_sampling(plan.config, progress=cfg.logging.progress_bar)


def _run_split(cfg: PebrConfig, work: Path, plan: StagePlan, results: dict[str, dict]) -> dict:
    out = work / "split"
    res = split_files(plan.source, cfg.pipeline.grpo_file, out, n=cfg.sample.n,
                      threshold=cfg.sample.correct_threshold, columns=cfg.data.columns)
    for line in format_summary(res, out):
        print(line)
    return {"counts": res.counts(), "dir": str(out)}


def _run_grpo(plan: StagePlan, results: dict[str, dict]) -> dict:
    if plan.status == "skipped":
        print(f"[pipeline] {plan.stage}: {plan.note}; the stage is skipped and passes {plan.init_model} on")
        return dict(plan.result)
    c = plan.config
    known = known_evaluation(results, plan.init_model, eval_set_of(c, c.grpo))
    return GRPOTrainer(c, eval_before=known).train().to_dict()


def _run_stage1(cfg: PebrConfig, work: Path, plan: StagePlan, results: dict[str, dict]) -> dict:
    return _run_grpo(plan, results)


def _run_stage2(cfg: PebrConfig, work: Path, plan: StagePlan, results: dict[str, dict]) -> dict:
    return _run_grpo(plan, results)


def _run_export(cfg: PebrConfig, work: Path, plan: StagePlan, results: dict[str, dict]) -> dict:
    src = Path(plan.init_model)
    verify_hf_weights(src, "the final model's source")  # a damaged stage model is not published as final
    with atomic_dir(work / "final") as tmp:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return {"model_dir": str(work / "final"), "source": str(src)}


_RUNNERS = {"sft": _run_sft, "sample": _run_sample, "split": _run_split, "stage1": _run_stage1,
            "stage2": _run_stage2, "export": _run_export}


# Evaluation metrics that depend on the stage's reward function (each stage has its own preset).
REWARD_METRICS = ("eval/reward",)


def known_evaluation(results: dict, model_dir: str, eval_set: dict | None) -> dict | None:
    """The final evaluation an earlier stage of this pipeline made of `model_dir` (the model it exported) on
    `eval_set`, without the metrics of that stage's reward function, or None. A GRPO stage starting from that
    model need not measure it again: the same weights answer the same questions with the same settings the
    same way when the evaluation is greedy, so accuracy, format and description scores are the same; the reward-weighted
    score is not carried over (the next stage weighs the rewards otherwise) and is not re-measured either."""
    if eval_set is None or eval_set["temperature"] != 0:  # a sampled evaluation is re-measured
        return None
    for res in results.values():
        if (res and res.get("model_dir") == model_dir and res.get("eval_after") and not res.get("skipped")
                and res.get("eval_set") == eval_set):
            return {k: v for k, v in res["eval_after"].items() if not k.startswith(REWARD_METRICS)}
    return None
