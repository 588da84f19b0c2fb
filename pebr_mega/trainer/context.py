"""The run context: what every command that trains or generates sets up the same way.

Process groups (trainers only), the seeds, the run directory (with the resolved `config.yaml`), the tokenizer,
the image decoder and the request builder, plus loading the GRPO records a stage reads. It owns no model and
no engine: the trainers build those in the order memory needs (`pebr_mega.trainer.stage`).

A run directory (`run.output_dir`):

    config.yaml  fingerprint.json  metrics.jsonl  generations.jsonl  checkpoints/step_N/{actor/, trainer_state.pt}
    hf/  result.json  wandb-run-id

`fingerprint.json` records the settings that define the run (`pebr_mega.trainer.fingerprint`); a rerun into
the directory with other settings stops before anything loads, unless it is told to restart, which discards
the old run's state (`RESTART_DISCARDS`). What a start-up finds there (`check_run_dir`: new, resume, settings
differ, restart, refused) is decided by read-only functions, `outputs.check_output_dir` and `inspect_run_dir`;
the run acts on their verdict (`claim_output_dir`, `prepare_run_dir`) and `--dry-run` reports it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer

from pebr_mega.config import PebrConfig, to_yaml
from pebr_mega.data.decoders import make_image_decoder
from pebr_mega.data.images import ImageDecoder
from pebr_mega.data.images import ImageConfig
from pebr_mega.data.records import GRPORecord, image_root_for, load_grpo_file
from pebr_mega.data.template import PromptTemplate, load_prompt_template, write_prompt_template
from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.errors import DataError, OutputError, PebrError, SettingsMismatchError
from pebr_mega.logging import GENERATIONS_FILE, WANDB_ID_FILE
from pebr_mega.outputs import check_output_dir, claim_output_dir, lock_output_dir, write_text_atomic
from pebr_mega.parallel.groups import ParallelState, init_distributed, init_parallel, launch_rank, rank
from pebr_mega.rollout.requests import RequestBuilder
from pebr_mega.trainer.checkpointing import CheckpointManager
from pebr_mega.trainer.fingerprint import (FINGERPRINT, describe_diff, diff_settings, fingerprint_record,
                                           read_fingerprint, stage_settings)


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
        g = cfg.grpo.resolved()
        return cls(g.stage, g.init_model, (g.train_file, g.eval_file or cfg.data.eval_file or ""),
                   stage_settings(cfg, "grpo"))

    @classmethod
    def sft(cls, cfg: PebrConfig) -> "RunSpec":
        """The SFT warm-up: its train file, its `dataset_info.json` and its evaluation set."""
        sft = cfg.sft
        return cls("sft", sft.init_model, (sft.train_file, sft.dataset_info, sft.eval_file or cfg.data.eval_file or ""),
                   stage_settings(cfg, "sft"))


@dataclass
class RunContext:
    """One run's shared set-up; build it with `for_training` or `for_generation`."""

    cfg: PebrConfig
    stage: str
    out_dir: Path
    device: torch.device
    parallel: ParallelState | None
    tokenizer: object
    decoder: ImageDecoder
    prompt_template: PromptTemplate  # `data.format_prompt`, rendered around every problem
    requests: RequestBuilder

    @classmethod
    def for_training(cls, cfg: PebrConfig, spec: RunSpec, restart: bool = False) -> "RunContext":
        """Process groups for `model.tp`/`model.pp`, seeds, the run directory and the HF-side helpers of
        `spec.init_model` (an HF directory: the stage's starting weights). The run directory is claimed against
        the starting model and `spec.inputs`: a run never writes over what it reads. `spec.settings` are
        checked against the directory's record before anything else (`prepare_run_dir`); `restart` discards a
        previous run there."""
        init_model = str(check_hf_model_dir(spec.init_model, f"{spec.stage}: init_model"))
        out_dir = claim_output_dir(cfg.run.output_dir, [init_model, *spec.inputs], what=RUN_DIR_KEY, writes=RUN_FILES)
        if launch_rank() == 0:  # one process per job holds it (a job's ranks are processes)
            lock_output_dir(out_dir, RUN_DIR_KEY)  # before anything in it changes: a second run stops here
        prepare_run_dir(out_dir, spec.stage, spec.settings, restart)
        parallel = init_parallel(cfg.model.tp, cfg.model.pp, seed=cfg.run.seed)
        seed_everything(cfg.run.seed)
        if rank() == 0:
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
        return cls._with_helpers(cfg, spec.stage, out_dir, parallel.device, parallel, init_model, cfg.images)

    @classmethod
    def for_generation(cls, cfg: PebrConfig, model_dir: str, stage: str,
                       images: ImageConfig | None = None) -> "RunContext":
        """No Megatron groups (generation only; every sampling call is seeded), the helpers (`images`: image
        settings other than `cfg.images`, e.g. sampling's own pixel cap), and this rank's device.

        Under a launcher (torchrun: WORLD_SIZE > 1) the process joins the job's default process group first
        (`init_distributed`: NCCL with CUDA, gloo without, and the CUDA device of LOCAL_RANK), so each rank's
        rollout engine starts on its own GPU, with its own port (`sglang_engine.engine_port`), and the
        engine's collectives find the group; inside the pipeline the trainers' group is already there.
        """
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            init_distributed()
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return cls._with_helpers(cfg, stage, Path(cfg.run.output_dir), device, None, model_dir, images or cfg.images)

    @classmethod
    def _with_helpers(cls, cfg: PebrConfig, stage: str, out_dir: Path, device: torch.device,
                      parallel: ParallelState | None, model_dir: str, images: ImageConfig) -> "RunContext":
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        decoder = make_image_decoder(images, device)
        template = load_prompt_template(cfg.data.format_prompt)
        return cls(cfg, stage, out_dir, device, parallel, tokenizer, decoder, template,
                   RequestBuilder.from_config(cfg.data, images, tokenizer, decoder, template))

    def write_prompt_template(self, model_dir: Path) -> None:
        """Write the run's format prompt into an exported model directory (`format_prompt.jinja`)."""
        write_prompt_template(model_dir, self.prompt_template)

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes the run's files (rank 0)."""
        return rank() == 0

    def log(self, message: str) -> None:
        """Print once per job (rank 0)."""
        if self.is_main:
            print(message)

    def image_root(self, data_file: str) -> str:
        """Where `data_file`'s images live (`data.image_root`, else the file's folder)."""
        return image_root_for(data_file, self.cfg.data.image_root)

    def load_records(self, path: str, what: str) -> list[GRPORecord]:
        """The usable GRPO records of `path` (skips reported once); DataError when none is usable."""
        loaded = load_grpo_file(path, self.cfg.data)
        if loaded.skipped:
            self.log(f"{self.stage} {what} data: {loaded.report()}")
        if not loaded.records:
            raise DataError(f"{path}: no usable records for {self.stage} ({what})")
        return loaded.records


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
    if launch_rank() != 0:
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



def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
