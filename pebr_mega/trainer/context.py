"""The run context: what every command that trains or generates sets up the same way.

Process groups (trainers only), the seeds, the run directory (with the resolved `config.yaml`), the tokenizer,
the image decoder and the request builder, plus loading the GRPO records a stage reads. It owns no model and
no engine: the trainers build those in the order memory needs (`pebr_mega.trainer.stage`).

The run directory's layout and start-up checks are `pebr_mega.run.run_dir`'s; `RunContext.for_training` acts on
them.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

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
from pebr_mega.errors import DataError
from pebr_mega.outputs import claim_output_dir, lock_output_dir
from pebr_mega.parallel.groups import ParallelState, init_distributed, init_parallel, is_main_rank
from pebr_mega.rollout.requests import RequestBuilder
from pebr_mega.run.run_dir import RUN_DIR_KEY, RUN_FILES, RunSpec, prepare_run_dir


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
        if is_main_rank():  # one process per job holds it (a job's ranks are processes)
            lock_output_dir(out_dir, RUN_DIR_KEY)  # before anything in it changes: a second run stops here
        prepare_run_dir(out_dir, spec.stage, spec.settings, restart)
        parallel = init_parallel(cfg.model.tp, cfg.model.pp, seed=cfg.run.seed)
        seed_everything(cfg.run.seed)
        if is_main_rank():
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

    def log(self, message: str) -> None:
        """Print once per job (rank 0)."""
        if is_main_rank():
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


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
