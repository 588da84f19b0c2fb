"""`--dry-run` of `pebr train`, `sft`, `sample` and `pipeline`: the resolved plan as JSON, no model loaded.

Each stage is one object whose first keys are

    stage, prompts, rollout_batch, mini_batch, epochs, steps_per_epoch, total_steps,
    updates_per_step, samples_per_step, reward_weights, grading

followed by what they were computed from: the data file, the records read and skipped by reason, the
filters applied (`filters`) and those that need more than the config and the data (`filters_not_applied`,
with the reason), the partial batch an epoch drops, the evaluation set. `train` and `sft` add `run_dir`: what
the run's start-up finds in `run.output_dir`, decided by the run's own read-only checks
(`run.run_dir.check_run_dir`): `new`, `resume` (from which checkpoint step), `settings differ` (the differing keys
and the error the run stops with: the dry run then ends with that line, status 2), `restart` (with
`--force-restart`: what is discarded) or `refused` (not a directory pebr created, or one holding an input). The numbers come from the same
functions the trainers call (`trainer/stage_data.py`, `trainer/data_order.py`), so a dry run prints the run
that starts. What needs no model is applied: record validation, image files and their headers (sizes), and
the prompt-length filter when the stage's tokenizer (the `init_model` / `sample.model` directory) exists; the
model's weights are never read. SFT counts the conversations LLaMA-Factory's ShareGPT rules accept;
tokenising and decoding images (truncation, unreadable pixels) happen when the stage starts.

`pebr pipeline --dry-run` gives one object per stage with a `status`, the run's own answer for that stage
(`recipe/work_dir.plan_stage`, which `run_pipeline` asks as each stage's turn comes): `to run`, `done` (a `DONE`
file), `skipped` (as the pipeline skips it) or `pending input` (the file it reads is written by an earlier stage
of this run: the object then says which, and leaves the counts that depend on it `null`); a stage that cannot
run (the split without its rollouts) carries the run's `error`, and a training stage to run its `run_dir`. The stages' recorded fingerprints are checked
first, by the pipeline's own functions: a stage recorded with other settings is `settings differ`, with the
error the run stops with (every stage not done is then `stopped`); with `--force-restart` that stage carries a
`restart` note and it and the later stages are planned on the work directory without their folders, as the
run finds it once it has discarded them (a discarded stage outside `pipeline.stages` is `discarded`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from pebr_mega.config import PebrConfig, eval_source
from pebr_mega.data.images import ImageConfig, open_image
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.data.records import image_root_for, load_grpo_file, read_json_items
from pebr_mega.data.sft_records import SkipRecord, resolve_sft_source, to_conversation
from pebr_mega.data.template import load_prompt_template
from pebr_mega.errors import ImageError, PebrError
from pebr_mega.rewards import preset_weights
from pebr_mega.recipe.work_dir import (GRPO_INPUTS, STAGES, StageMismatch, StagePlan, WorkDir, check_pipeline_config,
                                       done_file, find_mismatch, plan_stage, stage_fingerprints, stage_result)
from pebr_mega.rollout.requests import RequestBuilder
from pebr_mega.run.run_dir import NEW, RunDirCheck, RunSpec, check_run_dir
from pebr_mega.stage_config import GRPOTrainerConfig, StageLoopConfig
from pebr_mega.trainer.stage_data import FILTER_LENGTH, RLSchedule, load_stage_records


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


# The commands that train into run.output_dir, and the spec their trainer checks it against.
RUN_SPECS: dict[str, Callable[[PebrConfig], RunSpec]] = {"train": RunSpec.grpo, "sft": RunSpec.sft}


def dry_run(cfg: PebrConfig, command: str, log: Callable[[str], None] = _stderr,
            restart: bool = False) -> dict | list[dict]:
    """The plan of `command` (`train`, `sft`, `sample`: one object; `pipeline`: one per stage), `restart` as
    the command's `--force-restart`. `train` and `sft` carry `run_dir`, what their start-up finds in
    `run.output_dir` (`run.run_dir.check_run_dir`)."""
    if command == "pipeline":
        return pipeline_plan(cfg, log=log, restart=restart)
    plans = {"train": grpo_plan, "sft": sft_plan, "sample": sample_plan}
    run_dir = check_run_dir(cfg, RUN_SPECS[command](cfg), restart=restart) if command in RUN_SPECS else None
    try:
        plan = plans[command](cfg, log=log)
    except PebrError:
        if run_dir is not None and run_dir.error is not None:
            raise run_dir.error from None  # the run stops at its run directory, before it reads the data
        raise
    if run_dir is not None:
        plan["run_dir"] = run_dir.report()
    return plan


def plan_error(plan: dict | list[dict]) -> str | None:
    """The reason the planned run cannot start, or None: the run directory's error as the run states it (its
    start-up checks the directory before it reads the data), else the first stage's `error`."""
    plans = plan if isinstance(plan, list) else [plan]
    for p in plans:
        if (p.get("run_dir") or {}).get("error"):
            return p["run_dir"]["error"]
    for p in plans:
        if p.get("error"):
            return f"{p['stage']}: {p['error']}"
    return None


# ------------------------------------------------------------------------------------------------ GRPO
def grpo_plan(cfg: PebrConfig, log: Callable[[str], None] = _stderr) -> dict:
    """One GRPO stage (`grpo.stage`) over `grpo.train_file`, filtered as the trainer filters it."""
    stage = cfg.grpo
    builder, why = _request_builder(cfg, cfg.images, stage.init_model, "grpo.init_model")
    data = load_stage_records(cfg, stage, builder, log=log, lengths=why is None)
    if why is not None:
        data.not_applied[FILTER_LENGTH] = why
    schedule = RLSchedule.of(cfg, stage, len(data.train))
    plan = _grpo_head(cfg, stage, schedule)
    plan.update({"train_file": stage.train_file, "records_read": data.read, "skipped": dict(sorted(data.skipped.items())),
                 "filters": data.filters, "filters_not_applied": data.not_applied,
                 "dropped_per_epoch": schedule.dropped_per_epoch, "max_steps": stage.max_steps,
                 "ppo_epochs": stage.ppo_epochs, "n": cfg.rollout.n, "seed": cfg.run.seed,
                 "eval": _grpo_eval(cfg, stage, len(data.holdout))})
    try:
        schedule.require_steps(stage, len(data.holdout))
    except PebrError as e:
        plan["error"] = str(e)
    return plan


def _grpo_head(cfg: PebrConfig, stage: GRPOTrainerConfig, schedule: RLSchedule | None) -> dict:
    """The required keys of a GRPO stage; the data-dependent ones are None without a `schedule`."""
    static = RLSchedule.of(cfg, stage, 0)
    return {"stage": stage.stage, "prompts": schedule.prompts if schedule else None,
            "rollout_batch": stage.rollout_batch_size, "mini_batch": stage.mini_batch_size, "epochs": stage.epochs,
            "steps_per_epoch": schedule.steps_per_epoch if schedule else None,
            "total_steps": schedule.total_steps if schedule else None,
            "updates_per_step": static.updates_per_step, "samples_per_step": static.samples_per_step,
            "reward_weights": preset_weights(cfg.rewards, stage.stage), "grading": cfg.rewards.answer_grading}


def _grpo_eval(cfg: PebrConfig, stage: GRPOTrainerConfig, held_out: int) -> dict:
    if held_out:
        return {"source": "grpo.eval_holdout", "records": held_out, "max_samples": stage.eval_max_samples}
    return _eval_file(cfg, stage)


def _eval_file(cfg: PebrConfig, loop: StageLoopConfig) -> dict:
    source = eval_source(cfg, loop)
    path = source.path
    if not path:
        return {"source": None, "note": "no evaluation (no eval file, no grpo.eval_holdout)"}
    out: dict[str, Any] = {"source": source.key, "file": path, "max_samples": loop.eval_max_samples}
    if Path(path).is_file():
        out["records"] = len(load_grpo_file(path, cfg.data).records)
    else:
        out["records"] = None
        out["note"] = "the file does not exist (yet)"
    return out


def _request_builder(cfg: PebrConfig, images: ImageConfig, model_dir: str, key: str) -> tuple[RequestBuilder, str | None]:
    """The stage's request builder for the screen, and why prompt lengths cannot be checked (None when they
    can: the tokenizer of `model_dir` loads; the weights are not read)."""
    decoder = PilImageDecoder(images)  # only its size rules are used: no pixel is decoded
    template = load_prompt_template(cfg.data.format_prompt)
    tokenizer, why = None, None
    if not model_dir or not Path(model_dir).is_dir():
        why = f"{key}={model_dir!r} does not exist (yet): its tokenizer counts the prompt tokens"
    else:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as e:  # a directory without tokenizer files, or unreadable ones
            why = f"{key}={model_dir!r}: no tokenizer loads ({type(e).__name__})"
    return RequestBuilder.from_config(cfg.data, images, tokenizer, decoder, template), why


# ------------------------------------------------------------------------------------------------ SFT
def sft_plan(cfg: PebrConfig, log: Callable[[str], None] = _stderr) -> dict:
    """The SFT warm-up over `sft.train_file`: the conversations LLaMA-Factory's ShareGPT rules accept; the last
    partial batch of an epoch is kept (ceil)."""
    sft = cfg.sft
    path, columns = resolve_sft_source(sft.train_file, sft.dataset_info, sft.dataset_name)
    items, bad = read_json_items(path)
    skipped = Counter(s.reason for s in bad)
    root = image_root_for(str(path), sft.image_root)
    kept = 0
    for item in items:
        try:
            conversation = to_conversation(item.value, columns, root, item.location,
                                           cfg.data.allow_images_outside_root)
            for image in conversation.images:
                open_image(image).close()  # the header only: a missing or unreadable file is skipped at start-up
            kept += 1
        except SkipRecord as e:
            skipped[e.args[0]] += 1
        except ImageError:
            skipped["image"] += 1  # the reason name the SFT start-up counts (data/sft_records.encode_sft_file)
    per_epoch = math.ceil(kept / sft.batch_size)
    eval_info = _eval_file(cfg, sft)
    plan = {"stage": "sft", "prompts": kept, "rollout_batch": None, "mini_batch": sft.batch_size,
            "epochs": sft.epochs, "steps_per_epoch": per_epoch, "total_steps": per_epoch * sft.epochs,
            "updates_per_step": 1, "samples_per_step": sft.batch_size,
            "reward_weights": preset_weights(cfg.rewards, "stage2") if eval_info["source"] else None,
            "grading": cfg.rewards.answer_grading,
            "train_file": str(path), "records_read": len(items) + len(bad), "skipped": dict(sorted(skipped.items())),
            "image_root": str(root),
            "filters": ["conversations: ShareGPT columns, roles and turns, one <image> per image "
                        "(data/sft_records.py, LLaMA-Factory's rules)",
                        "images: every file exists and its header reads (sft.image_root, else the file's folder)"],
            "filters_not_applied": {"pixels decoded, tokenised, truncated at sft.cutoff_len":
                                    "needs the pixels and the tokenizer: counted when the stage starts"},
            "last_batch": (kept % sft.batch_size) or min(kept, sft.batch_size), "seed": cfg.run.seed, "eval": eval_info}
    if kept == 0:
        plan["error"] = (f"{path}: no usable SFT conversations (read {len(items) + len(bad)}, skipped "
                         f"{dict(sorted(skipped.items()))})")
    return plan


# ------------------------------------------------------------------------------------------------ sampling
def sample_plan(cfg: PebrConfig, log: Callable[[str], None] = _stderr) -> dict:
    """Difficulty sampling: every question of `sample.dataset` that makes a prompt, n answers each, the last
    partial batch included, at sampling's own pixel cap."""
    sc = cfg.sample
    images = dataclasses.replace(cfg.images, max_pixels=sc.max_pixels)
    loaded = load_grpo_file(sc.dataset, cfg.data)
    if loaded.skipped:
        log(f"sample data: {loaded.report()}")
    builder, why = _request_builder(cfg, images, sc.model, "sample.model")
    kept, report = builder.screen(loaded.records, image_root_for(sc.dataset, cfg.data.image_root),
                                  lengths=why is None)
    skipped = Counter(loaded.counts)
    skipped.update(report.skipped)
    steps = math.ceil(len(kept) / sc.batch_size)
    filters = ["records: fields, one <image> per image, duplicate qids (data/records.py)",
               f"images readable and within [images.min_pixels, sample.max_pixels={sc.max_pixels}], from their headers"]
    return {"stage": "sample", "prompts": len(kept), "rollout_batch": sc.batch_size, "mini_batch": None, "epochs": 1,
            "steps_per_epoch": steps, "total_steps": steps, "updates_per_step": 0,
            "samples_per_step": sc.batch_size * sc.n, "reward_weights": None, "grading": cfg.rewards.answer_grading,
            "dataset": sc.dataset, "records_read": loaded.total, "skipped": dict(sorted(skipped.items())),
            "filters": filters + ([FILTER_LENGTH] if why is None else []),
            "filters_not_applied": {FILTER_LENGTH: why} if why else {}, "n": sc.n, "output": sc.output}


# ------------------------------------------------------------------------------------------------ pipeline
def pipeline_plan(cfg: PebrConfig, log: Callable[[str], None] = _stderr, restart: bool = False) -> list[dict]:
    """One object per stage of `pipeline.stages`: what `run_pipeline` does with it, asked of the same function
    (`work_dir.plan_stage`), after the recorded fingerprints are compared as `run_pipeline` compares them
    (`work_dir.find_mismatch`): a stage recorded with other settings stops the run (`settings differ`, with the
    real run's error; every stage not done is then `stopped`), or with `restart` (`--force-restart`) it and every
    later stage are planned on the work directory without their folders, as the run finds it after discarding
    them. A stage's input that an earlier stage of this run writes is `pending input`."""
    p = cfg.pipeline
    check_pipeline_config(p)
    work = Path(p.work_dir)
    mismatch = find_mismatch(work, stage_fingerprints(cfg, work))
    if mismatch is not None and not restart:
        return _stopped_pipeline(work, p.stages, mismatch)
    found = WorkDir(work, mismatch.redo if mismatch is not None else ())
    results: dict[str, dict] = {}
    out = []
    for stage in STAGES:
        if mismatch is not None and stage == mismatch.stage and stage not in p.stages:
            out.append({"stage": stage, "status": "discarded", "restart": mismatch.restart_note()})
        if stage not in p.stages:
            continue
        plan = plan_stage(cfg, found, stage, results)
        # what the stage hands on, as the run's result would: its model, where it will write it
        results[stage] = plan.result if plan.result is not None else {"model_dir": plan.model_dir}
        if plan.status in ("to run", "pending input"):
            found = found.will_write(plan.writes)
        report = _stage_report(cfg, plan, work, log)
        if plan.status == "to run" and stage in RUN_SPECS_OF_STAGE:
            report["run_dir"] = _stage_run_dir(plan.config, RUN_SPECS_OF_STAGE[stage], stage in found.discarded)
        if mismatch is not None and stage == mismatch.stage:
            report["restart"] = mismatch.restart_note()
        out.append(report)
    return out


# The pipeline's training stages, and the spec their trainer checks its folder (`run.output_dir`) against.
RUN_SPECS_OF_STAGE: dict[str, Callable[[PebrConfig], RunSpec]] = {
    "sft": RunSpec.sft, "stage1": RunSpec.grpo, "stage2": RunSpec.grpo}


def _stage_run_dir(c: PebrConfig, spec: Callable[[PebrConfig], RunSpec], discarded: bool) -> dict:
    """What the stage's trainer finds in its folder when it starts (`check_run_dir`, as `pebr train --dry-run`
    reports it): a folder a `--force-restart` discards is found new."""
    if discarded:
        return RunDirCheck(Path(c.run.output_dir), NEW).report()
    return check_run_dir(c, spec(c)).report()


def _stopped_pipeline(work: Path, stages: list[str], mismatch: StageMismatch) -> list[dict]:
    """The plan of a run that stops at start-up on `mismatch`: finished stages stay done, nothing runs."""
    out = []
    for stage in STAGES:
        if stage == mismatch.stage:
            out.append({"stage": stage, "status": "settings differ", "differences": mismatch.why,
                        "error": str(mismatch.error())})
        elif stage in stages and stage not in mismatch.redo and stage_result(work, stage) is not None:
            out.append({"stage": stage, "status": "done", "done_file": str(done_file(work, stage))})
        elif stage in stages:
            out.append({"stage": stage, "status": "stopped",
                        "note": f"the run stops at stage {mismatch.stage} before any stage runs"})
    return out


def _stage_report(cfg: PebrConfig, plan: StagePlan, work: Path, log: Callable[[str], None]) -> dict:
    """The dry run's object for one stage of the pipeline, from the run's own `plan` of it."""
    stage = plan.stage
    if plan.status == "done":
        return {"stage": stage, "status": "done", "done_file": str(done_file(work, stage))}
    if stage == "sft":
        return {**sft_plan(plan.config, log), "status": plan.status}
    if stage == "sample":
        return {**sample_plan(plan.config, log), "status": plan.status}
    if stage == "split":
        report = {"stage": "split", "status": plan.status, "input": str(plan.source), "n": cfg.sample.n,
                  "correct_threshold": cfg.sample.correct_threshold, "writes": [str(f) for f in plan.writes]}
        return report | ({"error": plan.error} if plan.error else {})
    if stage in GRPO_INPUTS:
        return _grpo_stage_report(plan, log)
    return {"stage": "export", "status": plan.status, "writes": plan.model_dir}


def _grpo_stage_report(plan: StagePlan, log: Callable[[str], None]) -> dict:
    c = plan.config
    if plan.status == "to run":
        return {**grpo_plan(c, log), "status": "to run", "init_model": plan.init_model}
    report = _grpo_head(c, c.grpo, None)  # the counts follow from a file not read: pending, or too small
    note = plan.note if plan.status == "pending input" else f"{plan.note}: the stage passes {plan.init_model} on"
    report.update({"status": plan.status, "train_file": str(plan.source), "init_model": plan.init_model,
                   "note": note})
    return report
