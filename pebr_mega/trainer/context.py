"""The run context: what every command that trains or generates sets up the same way.

Process groups (trainers only), the seeds, the run directory (with the resolved `config.yaml`), the tokenizer,
the image decoder and the request builder, plus loading the GRPO records a stage reads. It owns no model and
no engine: the trainers build those in the order memory needs (`pebr_mega.trainer.stage`).

A run directory (`run.output_dir`):

    config.yaml  fingerprint.json  metrics.jsonl  generations.jsonl  checkpoints/step_N/{actor/, trainer_state.pt}
    hf/  result.json  wandb-run-id

`fingerprint.json` records the settings that define the run (`pebr_mega.trainer.fingerprint`); a rerun into
the directory with other settings stops before anything loads, unless it is told to restart, which discards
the old run's state (`RESTART_DISCARDS`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoTokenizer

from pebr_mega.config import PebrConfig, to_yaml
from pebr_mega.data.decoders import make_image_decoder
from pebr_mega.data.images import ImageDecoder
from pebr_mega.data.images import ImageConfig
from pebr_mega.data.records import GRPORecord, image_root_for, load_grpo_records
from pebr_mega.data.template import PromptTemplate, load_prompt_template, write_prompt_template
from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.errors import DataError, SettingsMismatchError
from pebr_mega.logging import GENERATIONS_FILE, WANDB_ID_FILE
from pebr_mega.outputs import claim_output_dir, write_text_atomic
from pebr_mega.parallel.groups import ParallelState, init_parallel, rank
from pebr_mega.rollout.requests import RequestBuilder
from pebr_mega.trainer.fingerprint import (FINGERPRINT, describe_diff, diff_settings, fingerprint_record,
                                           read_fingerprint)


# What a run writes into run.output_dir (an input there would be overwritten: refused at start-up).
RUN_FILES = ("config.yaml", FINGERPRINT, "metrics.jsonl", GENERATIONS_FILE, "checkpoints", "hf", "result.json",
             WANDB_ID_FILE, "wandb")
# A restart removes the old run's state (wandb's local files stay: they are the old wandb run's history).
RESTART_DISCARDS = (FINGERPRINT, "metrics.jsonl", GENERATIONS_FILE, "checkpoints", "hf", "result.json", WANDB_ID_FILE)


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
    def for_training(cls, cfg: PebrConfig, init_model: str, stage: str, inputs: Sequence[str] = (),
                     settings: dict | None = None, restart: bool = False) -> "RunContext":
        """Process groups for `model.tp`/`model.pp`, seeds, the run directory and the HF-side helpers of
        `init_model` (an HF directory: the stage's starting weights). The run directory is claimed against
        `init_model` and `inputs` (the stage's data files): a run never writes over what it reads. `settings`
        (`fingerprint.stage_settings`) are checked against the directory's record before anything else
        (`prepare_run_dir`); `restart` discards a previous run there."""
        init_model = str(check_hf_model_dir(init_model, f"{stage}: init_model"))
        out_dir = claim_output_dir(cfg.run.output_dir, [init_model, *inputs], what="run.output_dir", writes=RUN_FILES)
        if settings is not None:
            prepare_run_dir(out_dir, stage, settings, restart)
        parallel = init_parallel(cfg.model.tp, cfg.model.pp, seed=cfg.run.seed)
        seed_everything(cfg.run.seed)
        if rank() == 0:
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
        return cls._with_helpers(cfg, stage, out_dir, parallel.device, parallel, init_model, cfg.images)

    @classmethod
    def for_generation(cls, cfg: PebrConfig, model_dir: str, stage: str,
                       images: ImageConfig | None = None) -> "RunContext":
        """No process groups (generation only, one process; every sampling call is seeded): the GPU when there is
        one, the helpers
        (`images`: image settings other than `cfg.images`, e.g. sampling's own pixel cap)."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
        loaded = load_grpo_records(path, self.cfg.data.image_root, require_images=self.cfg.data.require_images)
        if loaded.skipped:
            self.log(f"{self.stage} {what} data: {loaded.report()}")
        if not loaded.records:
            raise DataError(f"{path}: no usable records for {self.stage} ({what})")
        return loaded.records


def prepare_run_dir(out_dir: Path, stage: str, settings: dict, restart: bool = False) -> None:
    """Check `settings` against the run directory's `fingerprint.json` and record them (rank 0 writes).

    A directory recorded with other settings that holds run state (`has_run_state`) raises
    `SettingsMismatchError` naming the differing keys, unless `restart`, which discards the old run's state
    (`RESTART_DISCARDS`) first; one without run state (a run that stopped before its first checkpoint) is
    simply recorded anew. Every rank reads the record;
    only rank 0 changes the directory.
    """
    out_dir = Path(out_dir)
    recorded = read_fingerprint(out_dir / FINGERPRINT)
    diff = diff_settings(recorded, settings) if recorded is not None else []
    if diff and not restart and has_run_state(out_dir):
        raise SettingsMismatchError(
            f"run.output_dir {out_dir} holds a {stage} run made with other settings: {describe_diff(diff)}; "
            "pass --force-restart to discard it, or choose a new run.output_dir")
    if _launch_rank() != 0:
        return
    if restart:
        for name in RESTART_DISCARDS:
            target = out_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        for stale in out_dir.glob(".rank*"):
            shutil.rmtree(stale, ignore_errors=True)
    elif recorded is None and (out_dir / "checkpoints").is_dir():
        print(f"{stage}: {out_dir} has no {FINGERPRINT} (a run of an older pebr): resuming it without comparing "
              "settings")
    write_text_atomic(out_dir / FINGERPRINT, json.dumps({"fingerprint": fingerprint_record(stage, settings)},
                                                       indent=1, sort_keys=True) + "\n")


def has_run_state(out_dir: Path) -> bool:
    """Whether a run directory holds what a rerun would resume or reuse: a checkpoint, the result or the
    exported model (a run stopped before its first checkpoint leaves nothing to protect)."""
    return (any((out_dir / "checkpoints").glob("step_*")) or (out_dir / "result.json").is_file()
            or (out_dir / "hf").exists())


def _launch_rank() -> int:
    """This process's rank, also before the process groups exist (the launcher's RANK)."""
    return rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
