"""What every trainer of the recipe sets up the same way: parallel groups, data, actor(s), rollout engine,
rewards, evaluation, metrics, checkpoints and export.

A `Session` is built from the root config and the stage's own settings (model to start from, data files,
batch size), and owns the objects of one run directory (`run.output_dir`):

    config.yaml  metrics.jsonl  checkpoints/step_N/{actor/, trainer_state.pt}  hf/  result.json
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.config_fields import ConfigError
from pebr_mega.data.images import make_image_decoder
from pebr_mega.data.records import GRPORecord, load_grpo_records
from pebr_mega.data.template import load_prompt_template
from pebr_mega.errors import DataError
from pebr_mega.outputs import claim_output_dir
from pebr_mega.trainer.checkpointing import CheckpointManager
from pebr_mega.trainer.data_order import EpochSampler

# What a run writes into run.output_dir (an input there would be overwritten: refused at start-up).
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "hf", "result.json")
# Dense bf16 peak of the cards we know, for MFU (TFLOP/s).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Session:
    """The shared machinery of one training run (see the module docstring)."""

    def __init__(self, cfg: Any, init_model: str, train_file: str, eval_file: str = "", batch_size: int = 1,
                 shuffle: bool = True, stage: str = "run") -> None:
        from pebr_mega.config import to_yaml
        from pebr_mega.parallel.groups import init_parallel

        self.cfg = cfg
        self.stage = stage
        try:
            cfg.model.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.init_model = check_hf_model_dir(init_model, f"{stage}: init_model")
        self.out_dir = claim_output_dir(cfg.run.output_dir, [init_model, train_file, eval_file],
                                        what="run.output_dir", writes=RUN_FILES)
        self.state = init_parallel(cfg.model.tp, cfg.model.pp, seed=cfg.run.seed)
        self.device = self.state.device
        _seed_everything(cfg.run.seed)
        if _rank() == 0:
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.init_model)
        self.decoder = make_image_decoder(cfg.images, self.device)
        self.prompt_template = load_prompt_template(cfg.data.format_prompt)
        self.records: list[GRPORecord] = self._load_records(train_file, "train") if train_file else []
        self.eval_file = eval_file
        self.eval_records: list[GRPORecord] = self._load_records(eval_file, "eval") if eval_file else []
        if self.cfg.grpo.eval_max_samples:
            self.eval_records = self.eval_records[: self.cfg.grpo.eval_max_samples]
        self.sampler = EpochSampler(self.records, batch_size, seed=cfg.run.seed, shuffle=shuffle) if self.records else None
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", keep_last=cfg.grpo.keep_last)
        self.actor = self.ref_actor = self.engine = self.reward_model = None
        self._eval_requests = None
        self.resumed_state: dict = {}

    # ------------------------------------------------------------------------------------------ data
    def _load_records(self, path: str, what: str) -> list[GRPORecord]:
        loaded = load_grpo_records(path, self.cfg.data.image_root, require_images=self.cfg.data.require_images)
        if loaded.skipped and _rank() == 0:
            print(f"{self.stage} {what} data: {loaded.report()}")
        if not loaded.records:
            raise DataError(f"{path}: no usable records for {self.stage} ({what})")
        return loaded.records

    def image_root(self, path: str) -> str:
        """Where records' images live: `data.image_root`, else the dataset file's folder."""
        return self.cfg.data.image_root or str(Path(path).parent)

    def build_requests(self, records, path: str | None = None):
        """Rollout requests for `records` and the report of the skipped ones."""
        from pebr_mega.rollout.requests import build_requests

        root = self.image_root(path or self.cfg.grpo.train_file)
        return build_requests(records, self.tokenizer, self.decoder, root, self.cfg.data.max_prompt_length,
                              self.cfg.data.filter_overlong_prompts, self.cfg.images.merge_size, self.prompt_template)

    def sampling(self, seed: int, validation: bool = False):
        """The rollout (or validation) sampling parameters."""
        from pebr_mega.trainer.hf_io import stop_token_ids, vision_token_ids

        return self.cfg.rollout.sampling(stop_token_ids(self.tokenizer), seed=seed, validation=validation,
                                         banned_token_ids=vision_token_ids(self.tokenizer))

    # ------------------------------------------------------------------------------------------ models
    def build_actors(self, total_updates: int, with_reference: bool, lr: float, actor_cfg=None) -> None:
        """The trainable actor from `init_model`, and the frozen reference (the same weights) when asked."""
        from pebr_mega.actor.megatron_actor import build_actor

        acfg = actor_cfg or self.cfg.actor
        self.actor = build_actor(str(self.init_model), self.cfg.model, acfg, trainable=True,
                                 total_updates=total_updates, lr=lr)
        if with_reference:
            self.ref_actor = build_actor(str(self.init_model), self.cfg.model, acfg, trainable=False)

    def build_engine(self) -> None:
        """The rollout engine, loaded from `init_model` (the actor's starting weights)."""
        from pebr_mega.trainer.hf_io import make_rollout_engine

        self.engine = make_rollout_engine(self.cfg.rollout, self.init_model, self.device, seed=self.cfg.run.seed)

    def build_rewards(self, rewards_cfg) -> None:
        """The reward model of the stage preset (fails here when CLIP is needed but not configured)."""
        from pebr_mega.rewards import build_reward

        self.reward_model = build_reward(rewards_cfg)

    def reward_summary(self, results) -> dict[str, float]:
        """Means of the total and of every component, failure and warning counts."""
        from pebr_mega.rewards import summarize

        return summarize(results)

    def sync_engine(self) -> dict[str, float]:
        """Push the actor's weights into the rollout engine; returns sync bytes and time."""
        from pebr_mega.checkpoint.hf_mapping import HFMapping
        from pebr_mega.rollout.weight_sync import sync_weights

        self.engine.resume_memory()
        stats = sync_weights(self.actor.module, HFMapping(self.actor.arch), self.engine, self.cfg.rollout.weight_bucket_mb)
        self.engine.release_memory()
        return stats.metrics()

    # ------------------------------------------------------------------------------------------ eval
    def run_eval(self) -> dict[str, float]:
        """Held-out accuracy / format / reward with the validation sampling (n = 1); {} without an eval set."""
        from pebr_mega.trainer.evaluate import evaluate

        if not self.eval_records:
            return {}
        if self._eval_requests is None:
            self._eval_requests, report = self.build_requests(self.eval_records, self.eval_file)
            if report.skipped and _rank() == 0:
                print(f"{self.stage} eval: {report.summary()}")
        self.engine.resume_memory()
        out = evaluate(self.engine, self._eval_requests, self.sampling(seed=self.cfg.run.seed, validation=True),
                       reward_model=self.reward_model, batch_size=self.cfg.rollout.batch_size,
                       progress=_rank() == 0 and self.cfg.logging.progress_bar, grading=self.cfg.rewards.answer_grading)
        self.engine.release_memory()
        return out

    def load_or_run_eval(self, key: str) -> dict[str, float]:
        """The stored evaluation of a resumed run (so a resume does not re-measure `before`), else a fresh one."""
        if key in self.resumed_state:
            return self.resumed_state[key]
        self.resumed_state[key] = self.run_eval()
        return self.resumed_state[key]

    # ------------------------------------------------------------------------------------------ metrics
    def make_logger(self, total_steps: int, desc: str):
        """The metrics logger of this run (appending when resumed)."""
        from pebr_mega.config import to_dict
        from pebr_mega.logging import LoggingConfig, MetricsLogger

        lcfg = self.cfg.logging if _rank() == 0 else LoggingConfig(progress_bar=False)
        run_dir = self.out_dir if _rank() == 0 else self.out_dir / f".rank{_rank()}"
        return MetricsLogger(lcfg, run_dir, total_steps, run_config=to_dict(self.cfg), desc=desc,
                             resume=bool(self.resumed_state), start_step=int(self.resumed_state.get("step", 0)))

    def flops_metrics(self, train_tokens: int, forward_tokens: int, seconds: float) -> dict[str, float]:
        """Achieved model TFLOP/s (6N per trained token, 2N per forward-only token) and MFU on known cards."""
        n = self.num_parameters()
        flops = 6 * n * train_tokens + 2 * n * forward_tokens
        out = {"tflops": flops / max(seconds, 1e-9) / 1e12 / max(self.state.world_size, 1)}
        peak = self.cfg.run.peak_tflops or _known_peak(self.device)
        if peak:
            out["mfu"] = out["tflops"] / peak
        return out

    def num_parameters(self) -> int:
        """Parameters of the whole model (summed over pipeline stages, TP shards counted once)."""
        if not hasattr(self, "_num_params"):
            from pebr_mega.rollout.weight_sync import _stage_manifest

            local = sum(int(np.prod(shape)) for _, shape, _ in _stage_manifest(self.actor.module, self.state.tp))
            if self.state.pp > 1:
                from megatron.core import parallel_state as mpu

                t = torch.tensor([local], dtype=torch.float64)
                dist.all_reduce(t, group=mpu.get_pipeline_model_parallel_group())
                local = int(t.item())
            self._num_params = local
        return self._num_params

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, step: int) -> None:
        """Checkpoint the actor (distributed) and the trainer state (rank 0), atomically."""
        if _rank() == 0:
            tmp = self.checkpoints.prepare(step)
        _barrier()
        tmp = self.checkpoints.tmp_path(step)
        self.actor.save(tmp / "actor")
        if _rank() == 0:
            state = {"step": step, "data": self.sampler.position.state_dict() if self.sampler else None,
                     "rng": _rng_state(), **{k: v for k, v in self.resumed_state.items() if k.startswith("eval_")}}
            torch.save(state, tmp / "trainer_state.pt")
            self.checkpoints.commit(step, {"stage": self.stage})
        _barrier()

    def maybe_resume(self) -> int:
        """Load the newest complete checkpoint of this run, if any; returns the step to continue from."""
        latest = self.checkpoints.latest()
        if latest is None:
            return 0
        self.actor.load(latest / "actor")
        state = torch.load(latest / "trainer_state.pt", weights_only=False)
        if self.sampler is not None and state.get("data"):
            self.sampler.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        self.resumed_state = state
        if self.engine is not None:
            self.sync_engine()
        if _rank() == 0:
            print(f"{self.stage}: resumed from {latest} (step {state['step']})")
        return int(state["step"])

    def export(self, out_dir: str | Path) -> Path:
        """The actor as a complete HF directory (the template files come from `init_model`; the format-prompt
        template the run used is written beside them)."""
        from pebr_mega.trainer.hf_io import export_actor_to_hf

        return export_actor_to_hf(self.actor.module, self.init_model, out_dir, self.prompt_template)


def _known_peak(device: torch.device) -> float:
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
