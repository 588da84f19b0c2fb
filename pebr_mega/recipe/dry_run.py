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

`pebr pipeline --dry-run` gives one object per stage with a `status`: `to run`, `done` (a `DONE` file),
`skipped` (as the pipeline would skip it) or `pending input` (the file it reads is written by an earlier stage:
the object then says which, and leaves the counts that depend on it `null`). The stages' recorded fingerprints
are checked first, by the pipeline's own functions: a stage recorded with other settings is `settings differ`,
with the error the run stops with (every stage not done is then `stopped`); with `--force-restart` that stage
carries a `restart` note and it and the later stages are planned as the run plans them once their folders are
discarded (a discarded stage outside `pipeline.stages` is `discarded`).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pebr_mega.config import PebrConfig, eval_source
from pebr_mega.data.images import ImageConfig, open_image
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.data.records import image_root_for, load_grpo_file, read_json_items
from pebr_mega.data.sft_records import SkipRecord, resolve_sft_source, to_conversation
from pebr_mega.data.template import load_prompt_template
from pebr_mega.errors import ImageError, PebrError
from pebr_mega.rewards import preset_weights
from pebr_mega.rollout.requests import RequestBuilder
from pebr_mega.stage_config import GRPOTrainerConfig, StageLoopConfig
from pebr_mega.run.run_dir import RunSpec, check_run_dir
from pebr_mega.trainer.stage_data import FILTER_LENGTH, RLSchedule, load_stage_records

if TYPE_CHECKING:
    from pebr_mega.recipe.pipeline import StageMismatch

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
    """One object per stage of `pipeline.stages`, each configured as `run_pipeline` configures it, after the
    recorded fingerprints are compared as `run_pipeline` compares them (`pipeline.find_mismatch`): a stage
    recorded with other settings stops the run (`settings differ`, with the real run's error; every stage not
    done is then `stopped`), or with `restart` (`--force-restart`) it and every later stage are planned as
    if their folders were already discarded."""
    from pebr_mega.recipe import pipeline as pl  # heavy (the trainers import Megatron): only for this command

    p = cfg.pipeline
    pl.check_pipeline_config(p)
    work = Path(p.work_dir)
    mismatch = pl.find_mismatch(work, pl.stage_fingerprints(cfg, work))
    if mismatch is not None and not restart:
        return _stopped_pipeline(work, p.stages, mismatch)
    found = _WorkDir(mismatch)
    # finished stages' results, and where a stage to run will write its model; a discarded stage that is not
    # run again has no result, so the stages after it fall back as they do on a missing DONE file
    results: dict[str, dict] = {s: {"model_dir": None} for s in found.discarded if s not in p.stages}
    out = []
    for stage in pl.STAGES:
        if mismatch is not None and stage == mismatch.stage and stage not in p.stages:
            out.append({"stage": stage, "status": "discarded", "restart": mismatch.restart_note()})
        if stage not in p.stages:
            continue
        done = None if stage in found.discarded else pl.stage_result(work, stage)
        if done is not None:
            results[stage] = done
            out.append({"stage": stage, "status": "done", "done_file": str(work / stage / "DONE")})
            continue
        plan = _pipeline_stage(cfg, work, results, stage, log, found)
        if mismatch is not None and stage == mismatch.stage:
            plan["restart"] = mismatch.restart_note()
        out.append(plan)
    return out


def _stopped_pipeline(work: Path, stages: list[str], mismatch: StageMismatch) -> list[dict]:
    """The plan of a run that stops at start-up on `mismatch`: finished stages stay done, nothing runs."""
    from pebr_mega.recipe import pipeline as pl

    out = []
    for stage in pl.STAGES:
        if stage == mismatch.stage:
            out.append({"stage": stage, "status": "settings differ", "differences": mismatch.why,
                        "error": str(mismatch.error())})
        elif stage in stages and stage not in mismatch.redo and pl.stage_result(work, stage) is not None:
            out.append({"stage": stage, "status": "done", "done_file": str(work / stage / "DONE")})
        elif stage in stages:
            out.append({"stage": stage, "status": "stopped",
                        "note": f"the run stops at stage {mismatch.stage} before any stage runs"})
    return out


@dataclasses.dataclass(frozen=True)
class _WorkDir:
    """The work directory as a `--force-restart` rerun finds it after its start-up check: the folders of the
    mismatched stage and of every later stage discarded (nothing discarded without a mismatch)."""

    mismatch: StageMismatch | None = None

    @property
    def discarded(self) -> tuple[str, ...]:
        return self.mismatch.redo if self.mismatch is not None else ()

    def has_file(self, path: Path) -> bool:
        """Whether the run finds the file `path`."""
        folders = self.mismatch.folders() if self.mismatch is not None else []
        return path.is_file() and not any(f == path or f in path.parents for f in folders)


def _pipeline_stage(cfg: PebrConfig, work: Path, results: dict, stage: str, log: Callable[[str], None],
                    found: _WorkDir) -> dict:
    from pebr_mega.recipe import pipeline as pl

    if stage == "sft":
        results["sft"] = {"model_dir": str(work / "sft" / "hf")}
        return {**sft_plan(pl.sft_stage_config(cfg, work), log), "status": "to run"}
    if stage == "sample":
        return {**sample_plan(pl.sample_stage_config(cfg, work, results), log), "status": "to run"}
    if stage == "split":
        rollouts = work / "sample" / "rollouts.jsonl"
        status = "to run" if found.has_file(rollouts) else "pending input"
        return {"stage": "split", "status": status, "input": str(rollouts), "n": cfg.sample.n,
                "correct_threshold": cfg.sample.correct_threshold,
                "writes": [str(work / "split" / f) for f in ("easycase.json", "mediumcase.json", "hardcase.json")]}
    if stage in ("stage1", "stage2"):
        return _pipeline_grpo(cfg, work, results, stage, log, found)
    return {"stage": "export", "status": "to run", "writes": str(work / "final")}


def _pipeline_grpo(cfg: PebrConfig, work: Path, results: dict, stage: str, log: Callable[[str], None],
                   found: _WorkDir) -> dict:
    from pebr_mega.recipe import pipeline as pl

    path = pl.grpo_train_file(cfg, work, stage)
    init = pl.grpo_init_model(cfg, work, results, stage)
    c = pl.grpo_stage_config(cfg, work, stage, path, init)
    g = c.grpo
    results[stage] = {"model_dir": str(work / stage / "hf")}
    if not found.has_file(path):
        plan = _grpo_head(c, g, None)
        plan.update({"status": "pending input", "train_file": str(path), "init_model": init,
                     "note": f"{path} is written by the split stage: prompts and steps follow from it"})
        return plan
    why = pl.grpo_skip_reason(c, path)
    if why is not None:  # as run_pipeline: the stage is skipped and passes its model on
        results[stage] = {"model_dir": init}
        plan = _grpo_head(c, g, None)
        plan.update({"status": "skipped", "train_file": str(path), "init_model": init,
                     "note": f"{why}: the stage passes {init} on"})
        return plan
    return {**grpo_plan(c, log), "status": "to run", "init_model": init}
