"""What a GRPO stage trains and evaluates on, and how many steps that makes: one place, read by the trainer
and by `--dry-run`, so the plan printed is the run that starts.

The records of `grpo.train_file` pass, in order:

1. reading and validation (`data/records.load_grpo_file`): fields and types, a non-blank answer and problem,
   one `<image>` per image, duplicate qids, image paths inside the image root (unless
   `data.allow_images_outside_root`) and (`data.require_images`) image files that exist;
2. the screen (`RequestBuilder.screen`), from image headers without decoding pixels: images readable and
   within the size rules, and the prompt at most `data.max_prompt_length` tokens
   (`data.filter_overlong_prompts`). Upstream filters over-long prompts when it builds the dataset, before
   the dataloader batches it (EasyR1 `verl/utils/dataset.py`, `RLHFDataset._filter_overlong_prompts`), so
   the step count is taken after this filter, as here;
3. the held-out slice (`grpo.eval_holdout`: N records drawn by `run.seed`, evaluated on, never trained on).

Epoch accounting (upstream's loader: `drop_last=True`, `training_steps = len(dataloader) x total_epochs` in
`verl/trainer/ray_trainer.py`): steps per epoch = floor(prompts / rollout batch), total = that x epochs
(`grpo.max_steps` caps it); each step has a full rollout batch and an epoch's last partial batch sits out.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from pebr_mega.config import PebrConfig, eval_source
from pebr_mega.config_fields import ConfigError
from pebr_mega.data.records import GRPORecord, image_root_for, load_grpo_file
from pebr_mega.errors import DataError
from pebr_mega.rollout.requests import RequestBuilder
from pebr_mega.stage_config import GRPOTrainerConfig

# What each filter is, as `--dry-run` names it.
FILTER_RECORDS = "records: fields, one <image> per image, duplicate qids (data/records.py)"
FILTER_IMAGE_FILES = "image files exist (data.require_images)"
FILTER_IMAGES = "images readable and within the size rules, from their headers (images.*)"
FILTER_LENGTH = "prompt <= data.max_prompt_length tokens (data.filter_overlong_prompts)"


@dataclass
class StageRecords:
    """The records a GRPO stage trains on, those it holds out, and what was filtered on the way."""

    train_file: str
    train: list[GRPORecord]
    holdout: list[GRPORecord] = field(default_factory=list)
    read: int = 0  # records (or JSONL lines) in the file
    skipped: Counter = field(default_factory=Counter)  # reason -> records
    filters: list[str] = field(default_factory=list)  # applied, in order
    not_applied: dict[str, str] = field(default_factory=dict)  # filter -> why it was not


def check_eval_source(cfg: PebrConfig, stage: GRPOTrainerConfig) -> None:
    """A held-out slice and an eval file are two evaluation sets: a ConfigError naming both keys. Checked here,
    on the stage's final config (the pipeline sets `grpo.eval_file` after loading, from `pipeline.eval_file`)."""
    if not stage.eval_holdout:
        return
    source = eval_source(cfg, stage)
    if source.path:
        raise ConfigError(f"grpo.eval_holdout={stage.eval_holdout} and {source.key}={source.path!r} both give "
                          f"{stage.stage} an evaluation set: set one of them ({source.key}= to use the held-out slice)")


def load_stage_records(cfg: PebrConfig, stage: GRPOTrainerConfig, builder: RequestBuilder | None,
                       log: Callable[[str], None] = print, lengths: bool = True) -> StageRecords:
    """`stage.train_file` through the filters of the module docstring; `builder` None skips the screen, and
    `lengths=False` screens the images only (no tokenizer). DataError when no record is usable."""
    check_eval_source(cfg, stage)
    path = stage.train_file
    loaded = load_grpo_file(path, cfg.data)
    out = StageRecords(path, loaded.records, read=loaded.total, skipped=Counter(loaded.counts),
                       filters=[FILTER_RECORDS] + ([FILTER_IMAGE_FILES] if cfg.data.require_images else []))
    if loaded.skipped:
        log(f"{stage.stage} train data: {loaded.report()}")
    if builder is not None:
        out.train, report = builder.screen(out.train, image_root_for(path, cfg.data.image_root), lengths=lengths)
        out.filters.append(FILTER_IMAGES)
        if lengths:
            out.filters.append(FILTER_LENGTH)
        out.skipped.update(report.skipped)
        if report.skipped:
            log(f"{stage.stage} train data, screened before batching: {report.summary()}")
    if not out.train:
        raise DataError(f"{path}: no usable records for {stage.stage} (read {out.read}, skipped "
                        f"{dict(sorted(out.skipped.items()))})")
    out.train, out.holdout = hold_out(out.train, stage.eval_holdout, cfg.run.seed, path)
    return out


def hold_out(records: list[GRPORecord], n: int, seed: int, path: str = "") -> tuple[list[GRPORecord], list[GRPORecord]]:
    """(train, held out): `n` records drawn by `seed` are held out; both keep the file's order."""
    if n == 0:
        return records, []
    if n >= len(records):
        raise DataError(f"grpo.eval_holdout={n} would hold out all {len(records)} usable records of {path}: "
                        "nothing left to train on")
    picked = set(torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return ([r for i, r in enumerate(records) if i not in picked], [r for i, r in enumerate(records) if i in picked])


@dataclass
class RLSchedule:
    """Steps and batch sizes of a GRPO stage over `prompts` training prompts (module docstring)."""

    prompts: int
    rollout_batch: int
    mini_batch: int
    epochs: int
    ppo_epochs: int
    n: int  # samples per prompt (rollout.n)
    max_steps: int = -1

    @classmethod
    def of(cls, cfg: PebrConfig, stage: GRPOTrainerConfig, prompts: int) -> "RLSchedule":
        """The schedule of `stage` (resolved) over `prompts` prompts."""
        return cls(prompts, stage.rollout_batch_size, stage.mini_batch_size, stage.epochs, stage.ppo_epochs,
                   cfg.rollout.n, stage.max_steps)

    @property
    def steps_per_epoch(self) -> int:
        return self.prompts // self.rollout_batch

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps > 0 else total

    @property
    def dropped_per_epoch(self) -> int:
        """Prompts an epoch leaves out (its last partial batch)."""
        return self.prompts % self.rollout_batch

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates per step: mini-batches per rollout batch x PPO epochs."""
        return math.ceil(self.rollout_batch / self.mini_batch) * self.ppo_epochs

    @property
    def samples_per_step(self) -> int:
        return self.rollout_batch * self.n

    def summary(self, stage: str, held_out: int = 0) -> str:
        """The schedule in one line, printed when the stage starts."""
        held = f" ({held_out} held out for evaluation)" if held_out else ""
        capped = f", capped by grpo.max_steps={self.max_steps}" if 0 < self.max_steps < self.steps_per_epoch * self.epochs else ""
        return (f"{stage}: {self.prompts} prompts{held}, rollout batch {self.rollout_batch} -> {self.steps_per_epoch} "
                f"steps per epoch ({self.dropped_per_epoch} prompts sit out each epoch) x {self.epochs} epochs = "
                f"{self.total_steps} steps{capped}; {self.updates_per_step} updates and {self.samples_per_step} samples "
                "per step")

    def require_steps(self, stage: GRPOTrainerConfig, held_out: int = 0) -> None:
        """DataError when the prompts make no full rollout batch (the stage would have nothing to run)."""
        if self.steps_per_epoch == 0:
            held = f", after grpo.eval_holdout={held_out} held out" if held_out else ""
            raise DataError(f"{stage.train_file}: {self.prompts} usable prompts{held} make no full rollout batch of "
                            f"grpo.rollout_batch_size={self.rollout_batch} ({stage.stage}); an epoch drops its last "
                            f"partial batch, as upstream's loader does: use grpo.rollout_batch_size <= {self.prompts}")
