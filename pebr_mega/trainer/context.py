"""The run context: what every command that trains or generates sets up the same way.

Process groups (trainers only), the seeds, the run directory (with the resolved `config.yaml`), the tokenizer,
the image decoder and the request builder, plus loading the GRPO records a stage reads. It owns no model and
no engine: the trainers build those in the order memory needs (`pebr_mega.trainer.stage`).

A run directory (`run.output_dir`):

    config.yaml  metrics.jsonl  checkpoints/step_N/{actor/, trainer_state.pt}  hf/  result.json
"""
from __future__ import annotations

import random
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
from pebr_mega.errors import DataError
from pebr_mega.outputs import claim_output_dir
from pebr_mega.parallel.groups import ParallelState, init_parallel, rank
from pebr_mega.rollout.requests import RequestBuilder


# What a run writes into run.output_dir (an input there would be overwritten: refused at start-up).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "hf", "result.json")


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
    def for_training(cls, cfg: PebrConfig, init_model: str, stage: str, inputs: Sequence[str] = ()) -> "RunContext":
        """Process groups for `model.tp`/`model.pp`, seeds, the run directory and the HF-side helpers of
        `init_model` (an HF directory: the stage's starting weights). The run directory is claimed against
        `init_model` and `inputs` (the stage's data files): a run never writes over what it reads."""
        init_model = str(check_hf_model_dir(init_model, f"{stage}: init_model"))
        out_dir = claim_output_dir(cfg.run.output_dir, [init_model, *inputs], what="run.output_dir", writes=RUN_FILES)
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
