"""The run directory (`run.output_dir`): what a run writes there, what a start-up finds there, and acting on it.

    config.yaml  fingerprint.json  metrics.jsonl  generations.jsonl  checkpoints/step_N/{actor/, trainer_state.pt}
    hf/  result.json  wandb-run-id

`fingerprint.json` records the settings that define the run (`pebr_mega.run.fingerprint`); a rerun into
the directory with other settings stops before anything loads, unless it is told to restart, which discards
the old run's state (`RESTART_DISCARDS`). What a start-up finds there (`check_run_dir`: new, resume, settings
differ, restart, refused) is decided by read-only functions, `outputs.check_output_dir` and `inspect_run_dir`;
the run acts on their verdict (`claim_output_dir`, `prepare_run_dir`) and `--dry-run` reports it.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pebr_mega.config import PebrConfig, eval_source
from pebr_mega.errors import OutputError, PebrError, SettingsMismatchError
from pebr_mega.logging import GENERATIONS_FILE, WANDB_ID_FILE
from pebr_mega.outputs import check_output_dir, write_text_atomic
from pebr_mega.parallel.groups import is_main_rank
from pebr_mega.run.fingerprint import (FINGERPRINT, describe_diff, diff_settings, fingerprint_record,
                                       read_fingerprint, stage_settings)
from pebr_mega.run.stage_checkpoints import CheckpointManager

# What a run writes into run.output_dir (an input there would be overwritten: refused at start-up).
EVAL_RESULTS_FILE = "eval_after.jsonl"  # the final held-out evaluation, one row per question (paired comparisons)
RUN_FILES = ("config.yaml", FINGERPRINT, "metrics.jsonl", GENERATIONS_FILE, "checkpoints", "hf", "result.json",
             EVAL_RESULTS_FILE, WANDB_ID_FILE, "wandb")
RUN_DIR_KEY = "run.output_dir"
# A restart removes the old run's state (wandb's local files stay: they are the old wandb run's history).
RESTART_DISCARDS = (FINGERPRINT, "metrics.jsonl", GENERATIONS_FILE, "checkpoints", "hf", "result.json", EVAL_RESULTS_FILE,
                    WANDB_ID_FILE)


@dataclass(frozen=True)
class RunSpec:
    """What a training stage's start-up checks `run.output_dir` against: the stage's name, its starting model,
    the files it reads (the run never writes over them) and the settings that define its result."""

    stage: str
    init_model: str
    inputs: tuple[str, ...]
    settings: dict[str, Any]

    @classmethod
    def grpo(cls, cfg: PebrConfig) -> "RunSpec":
        """The GRPO stage `grpo.stage`: its train file and its evaluation set."""
        g = cfg.grpo
        return cls(g.stage, g.init_model, (g.train_file, eval_source(cfg, g).path), stage_settings(cfg, "grpo"))

    @classmethod
    def sft(cls, cfg: PebrConfig) -> "RunSpec":
        """The SFT warm-up: its train file, its `dataset_info.json` and its evaluation set."""
        sft = cfg.sft
        return cls("sft", sft.init_model, (sft.train_file, sft.dataset_info, eval_source(cfg, sft).path),
                   stage_settings(cfg, "sft"))


# What a start-up finds in its run directory (`RunDirCheck.status`).
NEW, RESUME, SETTINGS_DIFFER, RESTART, REFUSED = "new", "resume", "settings differ", "restart", "refused"


@dataclass(frozen=True)
class RunDirCheck:
    """What a run finds in its run directory at start-up, before it changes anything: `status` (`NEW`,
    `RESUME`, `SETTINGS_DIFFER`, `RESTART`, `REFUSED`), the error it stops with (`SETTINGS_DIFFER`,
    `REFUSED`), the differing keys, the newest complete checkpoint (the one a resume loads once it verifies)
    and what a restart discards."""

    path: Path
    status: str
    error: PebrError | None = None
    differences: tuple[str, ...] = ()
    recorded: bool = False  # the directory holds a fingerprint.json
    checkpoint_step: int | None = None
    discards: tuple[str, ...] = ()

    def report(self) -> dict[str, Any]:
        """The check as JSON values (the `run_dir` entry of a dry run's plan)."""
        out: dict[str, Any] = {"path": str(self.path), "status": self.status}
        if self.error is not None:
            out["error"] = str(self.error)
        if self.differences:
            out["differences"] = list(self.differences)
        if self.status == RESUME:
            out["checkpoint_step"] = self.checkpoint_step
            out["note"] = (f"resumes from checkpoints/step_{self.checkpoint_step} once its checksums verify (a "
                           "damaged one falls back to the next newest)" if self.checkpoint_step is not None else
                           "no checkpoint: the run starts from step 0 and replaces the result")
            if not self.recorded:
                out["note"] += f"; no {FINGERPRINT} (a run of an older pebr): settings not compared"
        elif self.status == RESTART:
            out["discards"] = list(self.discards)
        elif self.status == NEW and self.differences:
            out["note"] = f"a run with other settings stopped before its first checkpoint: {FINGERPRINT} is recorded anew"
        return out


def check_run_dir(cfg: PebrConfig, spec: RunSpec, restart: bool = False) -> RunDirCheck:
    """What `RunContext.for_training` finds in `run.output_dir`, without changing anything: the claim
    (`outputs.check_output_dir`: `REFUSED` with the run's `OutputError`), then the recorded settings
    (`inspect_run_dir`). The starting model is compared as given (the run resolves it first; the comparison
    resolves both)."""
    try:
        out_dir = check_output_dir(cfg.run.output_dir, [spec.init_model, *spec.inputs], what=RUN_DIR_KEY,
                                   writes=RUN_FILES)
    except OutputError as e:
        return RunDirCheck(Path(cfg.run.output_dir), REFUSED, error=e)
    return inspect_run_dir(out_dir, spec.stage, settings=spec.settings, restart=restart)


def inspect_run_dir(out_dir: Path, stage: str, settings: dict, restart: bool = False) -> RunDirCheck:
    """Compare `settings` with the run directory's `fingerprint.json`; reads only.

    A directory recorded with other settings that holds run state (`has_run_state`) is `SETTINGS_DIFFER`, with
    a `SettingsMismatchError` naming the differing keys, unless `restart` (`RESTART`: the old run's
    `RESTART_DISCARDS` go); one without run state (a run that stopped before its first checkpoint) is `NEW`
    and simply recorded anew; one with run state and the same settings (or none recorded) is `RESUME`.
    """
    out_dir = Path(out_dir)
    recorded = read_fingerprint(out_dir / FINGERPRINT)
    diff = tuple(diff_settings(recorded, settings)) if recorded is not None else ()
    steps = CheckpointManager(out_dir / "checkpoints").steps()
    common = dict(differences=diff, recorded=recorded is not None, checkpoint_step=steps[-1] if steps else None)
    if restart:
        discards = tuple(name for name in RESTART_DISCARDS if (out_dir / name).exists())
        return RunDirCheck(out_dir, RESTART if discards else NEW, discards=discards, **common)
    if not has_run_state(out_dir):
        return RunDirCheck(out_dir, NEW, **common)
    if diff:
        return RunDirCheck(out_dir, SETTINGS_DIFFER, error=SettingsMismatchError(
            f"{RUN_DIR_KEY} {out_dir} holds a {stage} run made with other settings: {describe_diff(list(diff))}; "
            "pass --force-restart to discard it, or choose a new run.output_dir"), **common)
    return RunDirCheck(out_dir, RESUME, **common)


def prepare_run_dir(out_dir: Path, stage: str, settings: dict, restart: bool = False) -> RunDirCheck:
    """Act on `inspect_run_dir`: raise its error, or (rank 0) discard the old run's state on `RESTART` and
    record `settings` in `fingerprint.json`. Every rank reads the record; only rank 0 changes the directory.
    Returns the check."""
    out_dir = Path(out_dir)
    check = inspect_run_dir(out_dir, stage, settings, restart)
    if check.error is not None:
        raise check.error
    if not is_main_rank():
        return check
    if restart:
        for name in RESTART_DISCARDS:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for stale in out_dir.glob(".rank*"):
            shutil.rmtree(stale, ignore_errors=True)
    elif check.status == RESUME and not check.recorded:
        print(f"{stage}: {out_dir} has no {FINGERPRINT} (a run of an older pebr): resuming it without comparing "
              "settings")
    write_text_atomic(out_dir / FINGERPRINT, json.dumps({"fingerprint": fingerprint_record(stage, settings)},
                                                       indent=1, sort_keys=True) + "\n")
    return check


def has_run_state(out_dir: Path) -> bool:
    """Whether a run directory holds what a rerun would resume or reuse: a checkpoint, the result or the
    exported model (a run stopped before its first checkpoint leaves nothing to protect)."""
    return (any((out_dir / "checkpoints").glob("step_*")) or (out_dir / "result.json").is_file()
            or (out_dir / "hf").exists())
