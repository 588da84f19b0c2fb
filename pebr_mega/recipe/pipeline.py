"""The whole recipe as one command: sft -> sample -> split -> stage 1 -> stage 2 -> export.

Every stage writes into `pipeline.work_dir/<stage>/`: a `STARTED` file when it starts and, when it has
finished, a `DONE` file holding its result; both carry the stage's fingerprint (`stage_fingerprints`: the
settings that define its result, `pebr_mega.run.fingerprint`, plus the digest of the stage before it)
and are written atomically. A re-run skips the stages that are done and resumes an interrupted one from its
newest checkpoint (the trainers resume by themselves). A stage recorded with other settings than the
re-run's stops the re-run before anything loads, with one line naming the first such stage and the keys
that differ; with `restart` (`--force-restart`) that stage and every stage after it are discarded and run
again, and the stages before it stay done. Each stage starts from the previous one's HF directory:

    sft/hf  --sample-->  sample/rollouts.jsonl  --split-->  split/{easy,medium,hard}case.json
    stage1 (easy, from sft/hf) -> stage1/hf;  stage2 (medium, from stage1/hf) -> stage2/hf -> final/

Upstream's code trains on the easy and the medium questions and leaves the hard ones unused; here they are
written out too (`split/hardcase.json`), for a user who wants them in the SFT set of a next round.
"""
from __future__ import annotations

import copy
import gc
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pebr_mega.checkpoint.hf_io import atomic_dir, verify_hf_weights
from pebr_mega.config import PebrConfig
from pebr_mega.data.records import image_root_for, read_json_items
from pebr_mega.data.split import format_summary, split_files
from pebr_mega.errors import PebrError, SettingsMismatchError
from pebr_mega.outputs import claim_output_dir, lock_output_dir, write_text_atomic
from pebr_mega.parallel.groups import is_main_rank
from pebr_mega.stage_config import PipelineConfig
from pebr_mega.run.fingerprint import (describe_diff, diff_settings, fingerprint_record, read_fingerprint,
                                           settings_digest, stage_settings)
from pebr_mega.trainer.grpo import GRPOTrainer
from pebr_mega.trainer.lifecycle import free_allocator_cache
from pebr_mega.trainer.sample import run_sampling
from pebr_mega.trainer.sft import SFTTrainer
from pebr_mega.trainer.stage import eval_set_of

STAGES = ("sft", "sample", "split", "stage1", "stage2", "export")


# A stage's own folders under the work directory (export also writes `final/`).
_FOLDERS = {stage: (stage,) for stage in STAGES} | {"export": ("export", "final")}
# Keys a GRPO stage of the pipeline derives from the stages before it (covered by their fingerprints).
_DERIVED_GRPO = ("grpo.init_model", "grpo.train_file")


def _done_file(work: Path, stage: str) -> Path:
    return work / stage / "DONE"


def _started_file(work: Path, stage: str) -> Path:
    return work / stage / "STARTED"


def stage_result(work: str | Path, stage: str) -> dict | None:
    """The recorded result of a finished stage, or None."""
    f = _done_file(Path(work), stage)
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    # A DONE file of an older pebr holds the result alone.
    return data["result"] if isinstance(data, dict) and "fingerprint" in data and "result" in data else data


def stage_fingerprints(cfg: PebrConfig, work: Path) -> dict[str, dict]:
    """Each stage's settings: those of the config the stage runs with (`fingerprint.stage_settings`), less
    what it derives from earlier stages, plus `after.<previous stage>`, the digest of the previous stage's
    settings (so a stage's fingerprint covers every stage before it)."""
    own = {
        "sft": stage_settings(sft_stage_config(cfg, work), "sft"),
        "sample": stage_settings(sample_stage_config(cfg, work, {}), "sample", exclude=("sample.model",)),
        "split": stage_settings(cfg, "split"),
        "stage1": stage_settings(grpo_stage_config(cfg, work, "stage1", Path(), ""), "grpo", exclude=_DERIVED_GRPO),
        "stage2": stage_settings(grpo_stage_config(cfg, work, "stage2", Path(), ""), "grpo", exclude=_DERIVED_GRPO),
        "export": {},
    }
    own["stage1"]["pipeline.stage1_data"] = cfg.pipeline.stage1_data  # which prompts, not a grpo.* key
    chained: dict[str, dict] = {}
    for i, stage in enumerate(STAGES):
        chained[stage] = dict(own[stage])
        if i:
            chained[stage][f"after.{STAGES[i - 1]}"] = settings_digest(chained[STAGES[i - 1]])
    return chained


@dataclass(frozen=True)
class StageMismatch:
    """The first stage whose recorded fingerprint differs from the run's: why (one line), and what a rerun does
    about it (stop with `error()`, or with `--force-restart` discard the `redo` stages' folders)."""

    work: Path
    stage: str
    why: str

    @property
    def redo(self) -> tuple[str, ...]:
        """The stage and every stage after it (a restart discards them all)."""
        return STAGES[STAGES.index(self.stage):]

    def error(self) -> SettingsMismatchError:
        """The error a rerun without `--force-restart` stops with."""
        return SettingsMismatchError(
            f"pipeline.work_dir {self.work}: stage {self.stage} was run with other settings: {self.why}; pass "
            f"--force-restart to redo {', '.join(self.redo)}, or choose a new pipeline.work_dir")

    def restart_note(self) -> str:
        """What a rerun with `--force-restart` says before discarding."""
        return f"{self.stage} was run with other settings ({self.why}): discarding {', '.join(self.redo)}"

    def folders(self) -> list[Path]:
        """The folders a restart removes."""
        return [self.work / folder for s in self.redo for folder in _FOLDERS[s]]


def find_mismatch(work: Path, plan: dict[str, dict]) -> StageMismatch | None:
    """The first stage whose recorded fingerprint (DONE, else STARTED) differs from `plan`, or None. Reads only."""
    for i, stage in enumerate(STAGES):
        recorded = read_fingerprint(_done_file(work, stage)) or read_fingerprint(_started_file(work, stage))
        if recorded is None:
            continue  # not run here yet, or recorded by an older pebr (its DONE stays valid)
        diff = diff_settings(recorded, plan[stage])
        if not diff:
            continue
        own = [d for d in diff if not d.startswith("after.")]
        why = describe_diff(own) if own else f"the stage before it ({STAGES[i - 1]}) has other settings now"
        return StageMismatch(work, stage, why)
    return None


def check_recorded_stages(work: Path, plan: dict[str, dict], restart: bool, log: Callable[[str], None]) -> None:
    """Compare each stage's recorded fingerprint with `plan` (`find_mismatch`); at the first that differs,
    raise `SettingsMismatchError` naming the keys, or with `restart` discard it and every later stage."""
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
    write_text_atomic(_started_file(work, stage),
                      json.dumps({"fingerprint": fingerprint_record(stage, settings)}, indent=1) + "\n")


def _mark_done(work: Path, stage: str, result: dict, settings: dict) -> dict:
    _done_file(work, stage).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(_done_file(work, stage), json.dumps(
        {"result": result, "fingerprint": fingerprint_record(stage, settings)}, indent=2, default=str) + "\n")
    return result


def grpo_skip_reason(c: PebrConfig, path: Path) -> str | None:
    """Why the pipeline skips a GRPO stage, or None: its split file holds fewer questions, less the held-out
    evaluation slice, than one rollout batch (upstream's loader drops a partial batch: no step either)."""
    g = c.grpo
    count = len(read_json_items(path)[0]) if path.is_file() else 0
    if count - g.eval_holdout >= g.rollout_batch_size:
        return None
    held = f" ({g.eval_holdout} held out for evaluation)" if g.eval_holdout else ""
    return (f"{count} questions in {path}{held}, fewer than one rollout batch "
            f"(grpo.rollout_batch_size={g.rollout_batch_size})")


def run_pipeline(cfg: PebrConfig, log: Callable[[str], None] = print, restart: bool = False) -> dict[str, dict]:
    """Run the stages listed in `cfg.pipeline.stages` in order; returns each stage's result. `restart`
    discards the stages recorded with other settings (and the stages after them) instead of stopping."""
    p = cfg.pipeline
    check_pipeline_config(p)
    work = claim_output_dir(p.work_dir, [p.base_model, p.sft_file, p.grpo_file, p.eval_file],
                            what="pipeline.work_dir", writes=[*STAGES, "final"])
    if is_main_rank():  # one process per job holds it (a job's ranks are processes)
        lock_output_dir(work, "pipeline.work_dir")
    plan = stage_fingerprints(cfg, work)
    check_recorded_stages(work, plan, restart, log)
    results: dict[str, dict] = {}
    runners = {"sft": _run_sft, "sample": _run_sample, "split": _run_split, "stage1": _run_stage1,
               "stage2": _run_stage2, "export": _run_export}
    for stage in STAGES:
        if stage not in p.stages:
            continue
        done = stage_result(work, stage)
        if done is not None:
            log(f"[pipeline] {stage}: already done, skipping")
            results[stage] = done
            continue
        log(f"[pipeline] {stage}: starting")
        _mark_started(work, stage, plan[stage])
        t0 = time.time()
        res = runners[stage](cfg, work, results)
        # The stage's engine is shut down (EngineLifecycle.close); its actor is garbage now: collect it and give
        # its cached blocks back before the next stage sizes its engine's KV pool from the free memory.
        gc.collect()
        free_allocator_cache()
        res["seconds"] = round(time.time() - t0, 1)
        results[stage] = _mark_done(work, stage, res, plan[stage])
        log(f"[pipeline] {stage}: done in {res['seconds']:.0f}s")
    return results


def check_pipeline_config(p: PipelineConfig) -> None:
    """PebrError for unknown stages or a missing input of `pipeline` (its section of the config)."""
    unknown = [s for s in p.stages if s not in STAGES]
    if unknown:
        raise PebrError(f"pipeline.stages has unknown stages {unknown}; valid: {list(STAGES)}")
    for key in ("base_model", "sft_file", "grpo_file"):
        if not getattr(p, key):
            raise PebrError(f"pipeline.{key} is not set")


def _stage_cfg(cfg: PebrConfig, out_dir: Path, data_file: str | None = None) -> PebrConfig:
    """A copy of `cfg` writing into `out_dir`, whose images resolve against `pipeline.image_root`, else the
    folder of the stage's source data file (the split files live elsewhere but name the same images)."""
    c = copy.deepcopy(cfg)
    c.run.output_dir = str(out_dir)
    if data_file is not None:
        c.data.image_root = image_root_for(data_file, cfg.pipeline.image_root or cfg.data.image_root)
    return c


def _model_of(work: Path, stage: str, results: dict, fallback: str) -> str:
    res = results.get(stage) or stage_result(work, stage)
    return res["model_dir"] if res and res.get("model_dir") else fallback


def sft_stage_config(cfg: PebrConfig, work: Path) -> PebrConfig:
    """The config the pipeline's SFT stage runs with."""
    c = _stage_cfg(cfg, work / "sft", cfg.pipeline.sft_file)
    c.sft.init_model, c.sft.train_file = cfg.pipeline.base_model, cfg.pipeline.sft_file
    c.data.eval_file = cfg.pipeline.eval_file or c.data.eval_file
    return c


def sample_stage_config(cfg: PebrConfig, work: Path, results: dict) -> PebrConfig:
    """The config the pipeline's sampling stage runs with (from the SFT model)."""
    c = _stage_cfg(cfg, work / "sample", cfg.pipeline.grpo_file)
    c.sample.model = _model_of(work, "sft", results, cfg.pipeline.base_model)
    c.sample.dataset = cfg.pipeline.grpo_file
    c.sample.output = str(work / "sample" / "rollouts.jsonl")
    return c


def grpo_stage_config(cfg: PebrConfig, work: Path, stage: str, train_file: Path, init: str) -> PebrConfig:
    """The config the pipeline's GRPO `stage` runs with: `grpo.stage` picks its sizes and reward preset."""
    c = _stage_cfg(cfg, work / stage, cfg.pipeline.grpo_file)
    c.grpo = c.grpo.for_stage(stage)
    c.grpo.init_model, c.grpo.train_file = init, str(train_file)
    c.grpo.eval_file = cfg.pipeline.eval_file or c.grpo.eval_file
    return c


GRPO_INPUTS = {"stage1": "easycase.json", "stage2": "mediumcase.json"}


def grpo_train_file(cfg: PebrConfig, work: Path, stage: str) -> Path:
    """The prompts a GRPO stage trains on: its split file (`GRPO_INPUTS`), or for stage 1 with
    `pipeline.stage1_data=grpo` every question of `pipeline.grpo_file`."""
    if stage == "stage1" and cfg.pipeline.stage1_data == "grpo":
        return Path(cfg.pipeline.grpo_file)
    return work / "split" / GRPO_INPUTS[stage]


def grpo_init_model(cfg: PebrConfig, work: Path, results: dict, stage: str) -> str:
    """Where a GRPO stage starts: stage 1 from the SFT model, stage 2 from stage 1's (each falling back)."""
    sft = _model_of(work, "sft", results, cfg.pipeline.base_model)
    return sft if stage == "stage1" else _model_of(work, "stage1", results, sft)


def _run_sft(cfg: PebrConfig, work: Path, results: dict) -> dict:
    return SFTTrainer(sft_stage_config(cfg, work)).train().to_dict()


def _run_sample(cfg: PebrConfig, work: Path, results: dict) -> dict:
    return run_sampling(sample_stage_config(cfg, work, results), progress=cfg.logging.progress_bar)


def _run_split(cfg: PebrConfig, work: Path, results: dict) -> dict:
    out = work / "split"
    res = split_files(work / "sample" / "rollouts.jsonl", cfg.pipeline.grpo_file, out, n=cfg.sample.n,
                      threshold=cfg.sample.correct_threshold, columns=cfg.data.columns)
    for line in format_summary(res, out):
        print(line)
    return {"counts": res.counts(), "dir": str(out)}


def _run_grpo(cfg: PebrConfig, work: Path, results: dict, stage: str) -> dict:
    path = grpo_train_file(cfg, work, stage)
    init = grpo_init_model(cfg, work, results, stage)
    c = grpo_stage_config(cfg, work, stage, path, init)
    why = grpo_skip_reason(c, path)
    if why is not None:
        print(f"[pipeline] {stage}: {why}; the stage is skipped and passes {init} on")
        return {"model_dir": init, "skipped": why}
    known = known_evaluation(results, init, eval_set_of(c, c.grpo))
    return GRPOTrainer(c, eval_before=known).train().to_dict()


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


def _run_stage1(cfg: PebrConfig, work: Path, results: dict) -> dict:
    return _run_grpo(cfg, work, results, "stage1")


def _run_stage2(cfg: PebrConfig, work: Path, results: dict) -> dict:
    return _run_grpo(cfg, work, results, "stage2")


def _run_export(cfg: PebrConfig, work: Path, results: dict) -> dict:
    src = Path(_model_of(work, "stage2", results, _model_of(work, "stage1", results,
                                                             _model_of(work, "sft", results, cfg.pipeline.base_model))))
    verify_hf_weights(src, "the final model's source")  # a damaged stage model is not published as final
    with atomic_dir(work / "final") as tmp:
        for f in src.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    return {"model_dir": str(work / "final"), "source": str(src)}
