"""The SFT warm-up on the Megatron actor: ShareGPT conversations, loss on the assistant tokens only.

Upstream trains this stage with LLaMA-Factory (full fine-tune, lr 1e-5, warmup 0.1, cosine, 2 epochs,
cutoff 4096, vision tower and projector frozen); the same settings are `sft.*` here, so the whole recipe
runs in one framework. The data is read as LLaMA-Factory reads it (`pebr_mega.data.sft_records`): a
conversation longer than `sft.cutoff_len` tokens is truncated the way LLaMA-Factory truncates it, and counted.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pebr_mega.actor.config import ActorConfig
from pebr_mega.actor.megatron_actor import LossSpec
from pebr_mega.actor.packing import ActorSequence
from pebr_mega.config import PebrConfig, eval_source
from pebr_mega.data.images import ImageDecoder
from pebr_mega.data.records import image_root_for
from pebr_mega.data.sft_records import SFTReport, encode_sft_file, resolve_sft_source
from pebr_mega.errors import DataError
from pebr_mega.rewards import build_reward
from pebr_mega.stage_config import SFTConfig
from pebr_mega.run.run_dir import RunSpec
from pebr_mega.trainer.data_order import EpochSampler
from pebr_mega.trainer.stage import StageResult, StageTrainer


def load_sft_sequences(path: str | Path, tokenizer, decoder: ImageDecoder, image_root: str | Path, cutoff_len: int,
                       merge_size: int = 2, **read_options) -> tuple[list[ActorSequence], SFTReport]:
    """Tokenised conversations with their images (`encode_sft_file`, whose keyword options pass through) and
    the report of skipped and truncated ones."""
    examples, report = encode_sft_file(path, tokenizer, decoder, image_root, cutoff_len, merge_size, **read_options)
    return [ActorSequence(e.input_ids, e.loss_mask, e.pixel_values, e.image_grid_thw, index=i)
            for i, e in enumerate(examples)], report


def sft_actor_config(actor: ActorConfig, sft: SFTConfig) -> ActorConfig:
    """The actor settings SFT trains with: `actor.*`, except the keys the `sft` section also declares (`lr`,
    `warmup_ratio`, `lr_schedule`, `freeze_vision`, `freeze_projector`), which come from `sft.*`."""
    shared = {f.name for f in dataclasses.fields(ActorConfig)} & {f.name for f in dataclasses.fields(SFTConfig)}
    return dataclasses.replace(actor, **{k: getattr(sft, k) for k in sorted(shared)})


class SFTTrainer(StageTrainer):
    """Runs `cfg.sft` from `cfg.sft.init_model` into `cfg.run.output_dir`."""

    lr_key = "sft.lr"

    def __init__(self, cfg: PebrConfig, restart: bool = False) -> None:
        sft = cfg.sft
        super().__init__(cfg, sft, RunSpec.sft(cfg), restart=restart)
        train_file, columns = resolve_sft_source(sft.train_file, sft.dataset_info, sft.dataset_name)
        self.seqs, self.skipped = load_sft_sequences(train_file, self.ctx.tokenizer, self.ctx.decoder,
                                                     image_root_for(str(train_file), sft.image_root), sft.cutoff_len,
                                                     cfg.images.merge_size, columns=columns,
                                                     image_max_pixels=sft.image_max_pixels,
                                                     image_min_pixels=sft.image_min_pixels,
                                                     allow_outside_root=cfg.data.allow_images_outside_root)
        if self.skipped:
            self.ctx.log(f"sft data: {self.skipped}")
        if not self.seqs:
            raise DataError(f"{train_file}: no usable SFT conversations (read {self.skipped.total}, skipped "
                            f"{dict(sorted(self.skipped.skipped.items()))})")
        # The last partial batch of an epoch is kept, as the HF Trainer LLaMA-Factory runs keeps it
        # (`dataloader_drop_last` off): ceil(conversations / batch) updates per epoch (trainer/data_order.py).
        self.sampler = EpochSampler(self.seqs, sft.batch_size, seed=cfg.run.seed, drop_last=False)
        self.total_steps = self.sampler.steps_per_epoch() * sft.epochs
        self.ctx.log(f"sft: {len(self.seqs)} conversations, batch {sft.batch_size} -> {self.sampler.steps_per_epoch()} "
                     f"steps per epoch (the last one partial when it does not divide) x {sft.epochs} epochs = "
                     f"{self.total_steps} steps")
        if eval_source(cfg, self.loop).path:
            self.build_engine()  # before the actor: memory order (see trainer/stage.py)
        actor_cfg = sft_actor_config(cfg.actor, sft)
        self.ctx.log(f"sft: lr {actor_cfg.lr:g}, warmup {actor_cfg.warmup_ratio:g}, schedule {actor_cfg.lr_schedule}, "
                     f"freeze_vision {actor_cfg.freeze_vision}, freeze_projector {actor_cfg.freeze_projector} "
                     f"(from sft.*; every other actor.* key applies)")
        self.actor = self.build_actor(actor_cfg, self.total_steps)
        # Held-out reward of the SFT model with the stage-2 preset (accuracy and format).
        self.evaluator = self.build_evaluator(build_reward(cfg.rewards, "stage2") if self.lifecycle is not None else None)

    def train_step(self) -> dict[str, float]:
        """One optimizer update on the next batch of conversations (loss on the assistant tokens)."""
        t0 = time.perf_counter()
        epoch, batch = self.sampler.next_batch()
        m = self.actor.train_step(batch, LossSpec("sft"))
        m["skipped_updates"] = m.pop("skipped", 0.0)  # as GRPO names it: the console shows it when not zero
        m["epoch"] = epoch
        m["time/step"] = time.perf_counter() - t0
        tokens = sum(len(q.input_ids) for q in batch)
        m["tokens_per_s"] = tokens / m["time/step"]
        m.update(self.flops_metrics(train_tokens=tokens, forward_tokens=0, seconds=m["time/step"]))
        return m

    def summarize(self, result: StageResult, rows: list[dict]) -> None:
        """The loss of the first and the last step."""
        losses = [r["loss"] for r in rows if r.get("loss") is not None]
        if losses:
            result.first_loss, result.last_loss = losses[0], losses[-1]
