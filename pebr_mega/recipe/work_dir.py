"""The pipeline's work directory and what each stage does with it: decided once, for the run and its dry run.

`pebr pipeline` (`recipe/pipeline.py`) and `pebr pipeline --dry-run` (`recipe/dry_run.py`) both ask this module,
which imports no trainer and writes nothing:

- the start-up verdict on the work directory: the stages' fingerprints (`stage_fingerprints`) against the
  recorded ones (`find_mismatch`): go on, stop naming the first stage run with other settings, or with
  `--force-restart` discard that stage and every stage after it (`StageMismatch`);
- `plan_stage`: what one stage does when its turn comes (`StagePlan`): `done` (its `DONE` file), `to run` with
  the config it runs with, `skipped` (a GRPO split file with fewer questions than a rollout batch: the stage
  passes its starting model on) or `pending input` (its file is written by an earlier stage of this run).

The run asks `plan_stage` as each stage's turn comes, on the directory as the earlier stages left it; the dry
run asks it for every stage at once, on a `WorkDir` that hides what a restart discards and counts the files the
earlier stages will write as pending. Same question, same answer: the dry run cannot disagree with the run.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pebr_mega.config import PebrConfig, pipeline_eval_files
from pebr_mega.data.records import image_root_for, read_json_items
from pebr_mega.data.split import SPLIT_FILES
from pebr_mega.errors import PebrError, SettingsMismatchError
from pebr_mega.run.fingerprint import describe_diff, diff_settings, read_fingerprint, settings_digest, stage_settings
from pebr_mega.stage_config import PipelineConfig

STAGES = ("sft", "sample", "split", "stage1", "stage2", "export")
GRPO_INPUTS = {"stage1": "easycase.json", "stage2": "mediumcase.json"}
ROLLOUTS = ("sample", "rollouts.jsonl")  # under the work directory: sampling writes it, the split reads it

# A stage's own folders under the work directory (export also writes `final/`).
_FOLDERS = {stage: (stage,) for stage in STAGES} | {"export": ("export", "final")}
# Keys a GRPO stage of the pipeline derives from the stages before it (covered by their fingerprints).
_DERIVED_GRPO = ("grpo.init_model", "grpo.train_file")


def done_file(work: Path, stage: str) -> Path:
    """The file a finished stage's result and fingerprint are recorded in."""
    return work / stage / "DONE"


def started_file(work: Path, stage: str) -> Path:
    """The file a started stage's fingerprint is recorded in."""
    return work / stage / "STARTED"


def stage_result(work: str | Path, stage: str) -> dict | None:
    """The recorded result of a finished stage, or None."""
    f = done_file(Path(work), stage)
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    # A DONE file of an older pebr holds the result alone.
    return data["result"] if isinstance(data, dict) and "fingerprint" in data and "result" in data else data


def check_pipeline_config(p: PipelineConfig) -> None:
    """PebrError for unknown stages or a missing input of `pipeline` (its section of the config)."""
    unknown = [s for s in p.stages if s not in STAGES]
    if unknown:
        raise PebrError(f"pipeline.stages has unknown stages {unknown}; valid: {list(STAGES)}")
    for key in ("base_model", "sft_file", "grpo_file"):
        if not getattr(p, key):
            raise PebrError(f"pipeline.{key} is not set")


# ------------------------------------------------------------------------------------------------ stage configs
def _stage_cfg(cfg: PebrConfig, out_dir: Path, data_file: str | None = None) -> PebrConfig:
    """A copy of `cfg` writing into `out_dir`, whose images resolve against `pipeline.image_root`, else the
    folder of the stage's source data file (the split files live elsewhere but name the same images)."""
    c = copy.deepcopy(cfg)
    c.run.output_dir = str(out_dir)
    if data_file is not None:
        c.data.image_root = image_root_for(data_file, cfg.pipeline.image_root or cfg.data.image_root)
    return c


def sft_stage_config(cfg: PebrConfig, work: Path) -> PebrConfig:
    """The config the pipeline's SFT stage runs with."""
    c = _stage_cfg(cfg, work / "sft", cfg.pipeline.sft_file)
    c.sft.init_model, c.sft.train_file = cfg.pipeline.base_model, cfg.pipeline.sft_file
    c.data.eval_file = pipeline_eval_files(cfg)["data.eval_file"]
    return c


def sample_stage_config(cfg: PebrConfig, work: Path, model: str) -> PebrConfig:
    """The config the pipeline's sampling stage runs with, sampling `model` (the SFT model)."""
    c = _stage_cfg(cfg, work / "sample", cfg.pipeline.grpo_file)
    c.sample.model, c.sample.dataset = model, cfg.pipeline.grpo_file
    c.sample.output = str(work.joinpath(*ROLLOUTS))
    return c


def grpo_train_file(cfg: PebrConfig, work: Path, stage: str) -> Path:
    """The prompts a GRPO stage trains on: its split file (`GRPO_INPUTS`), or for stage 1 with
    `pipeline.stage1_data=grpo` every question of `pipeline.grpo_file`."""
    if stage == "stage1" and cfg.pipeline.stage1_data == "grpo":
        return Path(cfg.pipeline.grpo_file)
    return work / "split" / GRPO_INPUTS[stage]


def grpo_stage_config(cfg: PebrConfig, work: Path, stage: str, train_file: Path, init: str) -> PebrConfig:
    """The config the pipeline's GRPO `stage` runs with: `grpo.stage` picks its sizes and reward preset."""
    c = _stage_cfg(cfg, work / stage, cfg.pipeline.grpo_file)
    c.grpo = c.grpo.for_stage(stage)
    c.grpo.init_model, c.grpo.train_file = init, str(train_file)
    if stage == "stage1" and cfg.pipeline.stage1_max_steps:
        c.grpo.max_steps = cfg.pipeline.stage1_max_steps
    c.grpo.eval_file = pipeline_eval_files(cfg)["grpo.eval_file"]
    return c


def stage_fingerprints(cfg: PebrConfig, work: Path) -> dict[str, dict]:
    """Each stage's settings: those of the config the stage runs with (`fingerprint.stage_settings`), less
    what it derives from earlier stages, plus `after.<previous stage>`, the digest of the previous stage's
    settings (so a stage's fingerprint covers every stage before it)."""
    own = {
        "sft": stage_settings(sft_stage_config(cfg, work), "sft"),
        "sample": stage_settings(sample_stage_config(cfg, work, ""), "sample", exclude=("sample.model",)),
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


# ------------------------------------------------------------------------------------------------ start-up
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
        recorded = read_fingerprint(done_file(work, stage)) or read_fingerprint(started_file(work, stage))
        if recorded is None:
            continue  # not run here yet, or recorded by an older pebr (its DONE stays valid)
        diff = diff_settings(recorded, plan[stage])
        if not diff:
            continue
        own = [d for d in diff if not d.startswith("after.")]
        why = describe_diff(own) if own else f"the stage before it ({STAGES[i - 1]}) has other settings now"
        return StageMismatch(work, stage, why)
    return None


@dataclass(frozen=True)
class WorkDir:
    """The work directory as a stage finds it when its turn comes: the files on disk, less the folders of the
    stages a `--force-restart` start-up discards (`discarded`: `StageMismatch.redo`; only a dry run has any, the
    run has removed them), plus the files earlier stages of this run will write (`pending`: only a dry run has
    any; when running for real those stages have run)."""

    path: Path
    discarded: tuple[str, ...] = ()
    pending: frozenset[Path] = field(default_factory=frozenset)

    def _hidden(self, path: Path) -> bool:
        folders = [self.path / f for s in self.discarded for f in _FOLDERS[s]]
        return any(f == path or f in path.parents for f in folders)

    def has_file(self, path: Path) -> bool:
        """Whether the stage finds the file `path` (pending files not yet)."""
        return path.is_file() and not self._hidden(path)

    def result(self, stage: str) -> dict | None:
        """The recorded result of `stage`, None when it is not done or is discarded."""
        return None if stage in self.discarded else stage_result(self.path, stage)

    def questions(self, path: Path) -> int:
        """The questions of a GRPO split file the stage finds (0 when it finds none)."""
        return len(read_json_items(path)[0]) if self.has_file(path) else 0

    def will_write(self, paths: Iterable[Path]) -> "WorkDir":
        """This directory once an earlier stage of the run has written `paths`."""
        return dataclasses.replace(self, pending=self.pending | frozenset(paths))


# ------------------------------------------------------------------------------------------------ one stage
@dataclass(frozen=True)
class StagePlan:
    """What one stage does when its turn comes (`plan_stage`)."""

    stage: str
    status: str  # "done" | "to run" | "skipped" | "pending input"
    config: PebrConfig | None = None  # the config the stage runs with (sft, sample, stage1, stage2)
    result: dict | None = None  # done: the recorded result; skipped: the result the run records
    source: Path | None = None  # the file it reads that an earlier stage writes (split, stage1, stage2)
    init_model: str | None = None  # the model it starts from (GRPO) or publishes (export)
    model_dir: str | None = None  # the model it passes on to the stages after it
    writes: tuple[Path, ...] = ()  # the files it writes that later stages read
    note: str | None = None  # why it is skipped or pending
    error: str | None = None  # why it cannot run (the run stops there)


def grpo_skip_reason(c: PebrConfig, path: Path, count: int | None = None) -> str | None:
    """Why the pipeline skips a GRPO stage, or None: its split file holds fewer questions (`count`, else read
    from `path`; 0 when it is missing), less the held-out evaluation slice, than one rollout batch (upstream's
    loader drops a partial batch: no step either)."""
    g = c.grpo
    if count is None:
        count = len(read_json_items(path)[0]) if path.is_file() else 0
    if count - g.eval_holdout >= g.rollout_batch_size:
        return None
    held = f" ({g.eval_holdout} held out for evaluation)" if g.eval_holdout else ""
    return (f"{count} questions in {path}{held}, fewer than one rollout batch "
            f"(grpo.rollout_batch_size={g.rollout_batch_size})")


def model_of(work: WorkDir, results: dict[str, dict], stage: str, fallback: str) -> str:
    """The model `stage` passed on: its result in this run, else its recorded one, else `fallback`."""
    res = results[stage] if stage in results else work.result(stage)
    return res["model_dir"] if res and res.get("model_dir") else fallback


def grpo_init_model(cfg: PebrConfig, work: WorkDir, results: dict[str, dict], stage: str) -> str:
    """Where a GRPO stage starts: stage 1 from the SFT model, stage 2 from stage 1's (each falling back)."""
    sft = model_of(work, results, "sft", cfg.pipeline.base_model)
    return sft if stage == "stage1" else model_of(work, results, "stage1", sft)


def plan_stage(cfg: PebrConfig, work: WorkDir, stage: str, results: dict[str, dict]) -> StagePlan:
    """What `stage` does on `work` after the stages of this run before it produced `results` (stage -> result,
    at least its `model_dir`). Reads the work directory, writes nothing."""
    done = work.result(stage)
    if done is not None:
        return StagePlan(stage, "done", result=done, model_dir=done.get("model_dir"))
    w = work.path
    if stage == "sft":
        return StagePlan(stage, "to run", sft_stage_config(cfg, w), model_dir=str(w / "sft" / "hf"))
    if stage == "sample":
        c = sample_stage_config(cfg, w, model_of(work, results, "sft", cfg.pipeline.base_model))
        return StagePlan(stage, "to run", c, writes=(Path(c.sample.output),))
    if stage == "split":
        return _plan_split(work)
    if stage in GRPO_INPUTS:
        return _plan_grpo(cfg, work, stage, results)
    final = model_of(work, results, "stage2", model_of(work, results, "stage1", model_of(
        work, results, "sft", cfg.pipeline.base_model)))
    return StagePlan(stage, "to run", init_model=final, model_dir=str(w / "final"))


def _plan_split(work: WorkDir) -> StagePlan:
    rollouts = work.path.joinpath(*ROLLOUTS)
    writes = tuple(work.path / "split" / f for f in SPLIT_FILES.values())
    if rollouts in work.pending:
        return StagePlan("split", "pending input", source=rollouts, writes=writes)
    error = None if work.has_file(rollouts) else f"{rollouts} does not exist: the sample stage writes it"
    return StagePlan("split", "to run", source=rollouts, writes=writes, error=error)


def _plan_grpo(cfg: PebrConfig, work: WorkDir, stage: str, results: dict[str, dict]) -> StagePlan:
    path = grpo_train_file(cfg, work.path, stage)
    init = grpo_init_model(cfg, work, results, stage)
    c = grpo_stage_config(cfg, work.path, stage, path, init)
    own = str(work.path / stage / "hf")
    if path in work.pending:
        return StagePlan(stage, "pending input", c, source=path, init_model=init, model_dir=own,
                         note=f"{path} is written by the split stage: prompts and steps follow from it")
    why = grpo_skip_reason(c, path, work.questions(path))
    if why is not None:  # the stage passes its starting model on
        return StagePlan(stage, "skipped", c, {"model_dir": init, "skipped": why}, path, init, init, note=why)
    return StagePlan(stage, "to run", c, source=path, init_model=init, model_dir=own)
