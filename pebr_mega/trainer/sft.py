"""The SFT warm-up on the Megatron actor: ShareGPT conversations, loss on the assistant tokens only.

Upstream trains this stage with LLaMA-Factory (full fine-tune, lr 1e-5, warmup 0.1, cosine, 2 epochs,
cutoff 4096, vision tower and projector frozen); the same settings are `sft.*` here, so the whole recipe
runs in one framework. A conversation longer than `sft.cutoff_len` tokens is skipped and counted rather
than truncated (truncation could cut an image block in half).
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

from pebr_mega.actor.config import ActorConfig
from pebr_mega.actor.megatron_actor import LossSpec
from pebr_mega.actor.packing import ActorSequence
from pebr_mega.config import PebrConfig
from pebr_mega.data.images import ImageDecoder, load_image, num_image_tokens
from pebr_mega.data.prompts import render_conversation
from pebr_mega.errors import DataError, ImageError
from pebr_mega.rewards import build_reward
from pebr_mega.stage_config import SFTConfig
from pebr_mega.trainer.data_order import EpochSampler
from pebr_mega.trainer.stage import StageResult, StageTrainer


def load_sft_sequences(path: str | Path, tokenizer, decoder: ImageDecoder, image_root: str | Path, cutoff_len: int,
                       merge_size: int = 2) -> tuple[list[ActorSequence], Counter]:
    """Tokenised conversations with their images; bad records are skipped with the reason counted."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read SFT records ({e})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of ShareGPT records")
    seqs, skipped = [], Counter()
    for i, rec in enumerate(items):
        try:
            messages, images = rec["messages"], rec.get("images", [])
            pics = [load_image(Path(image_root) / p) for p in images]
            proc = decoder.decode_and_preprocess(pics).to("cpu") if pics else None
            tokens = num_image_tokens(proc.image_grid_thw, merge_size) if proc is not None else []
            conv = render_conversation(tokenizer, messages, tokens, where=f"{path} record {i}")
        except ImageError:
            skipped["image"] += 1
            continue
        except (DataError, KeyError, TypeError, AttributeError):
            skipped["record"] += 1
            continue
        if len(conv.input_ids) > cutoff_len:
            skipped["over_cutoff_len"] += 1
            continue
        if not any(conv.loss_mask):
            skipped["no_assistant_tokens"] += 1
            continue
        seqs.append(ActorSequence(conv.input_ids, conv.loss_mask, proc.pixel_values if proc is not None else None,
                                  proc.image_grid_thw if proc is not None else None, index=len(seqs)))
    return seqs, skipped


def sft_actor_config(actor: ActorConfig, sft: SFTConfig) -> ActorConfig:
    """The actor settings SFT trains with: `actor.*`, except the keys the `sft` section also declares (`lr`,
    `warmup_ratio`, `lr_schedule`, `freeze_vision`, `freeze_projector`), which come from `sft.*`."""
    shared = {f.name for f in dataclasses.fields(ActorConfig)} & {f.name for f in dataclasses.fields(SFTConfig)}
    return dataclasses.replace(actor, **{k: getattr(sft, k) for k in sorted(shared)})


class SFTTrainer(StageTrainer):
    """Runs `cfg.sft` from `cfg.sft.init_model` into `cfg.run.output_dir`."""

    def __init__(self, cfg: PebrConfig) -> None:
        sft = cfg.sft
        super().__init__(cfg, sft, name="sft", init_model=sft.init_model)
        self.seqs, self.skipped = load_sft_sequences(sft.train_file, self.ctx.tokenizer, self.ctx.decoder,
                                                     self.ctx.image_root(sft.train_file), sft.cutoff_len,
                                                     cfg.images.merge_size)
        if self.skipped:
            self.ctx.log(f"sft data: kept {len(self.seqs)}, skipped {dict(self.skipped)}")
        if not self.seqs:
            raise DataError(f"{sft.train_file}: no usable SFT conversations")
        self.sampler = EpochSampler(self.seqs, sft.batch_size, seed=cfg.run.seed)
        self.total_steps = self.sampler.steps_per_epoch() * sft.epochs
        if self.loop.eval_file or cfg.data.eval_file:
            self.build_engine()  # before the actor: memory order (see trainer/stage.py)
        actor_cfg = sft_actor_config(cfg.actor, sft)
        self.ctx.log(f"sft: lr {actor_cfg.lr:g}, warmup {actor_cfg.warmup_ratio:g}, schedule {actor_cfg.lr_schedule}, "
                     f"freeze_vision {actor_cfg.freeze_vision}, freeze_projector {actor_cfg.freeze_projector} "
                     f"(from sft.*; every other actor.* key applies)")
        self.actor = self.build_actor(actor_cfg, self.total_steps)
        # Held-out reward of the SFT model with the stage-2 preset (accuracy and format).
        self.evaluator = self.build_evaluator(build_reward(dataclasses.replace(cfg.rewards, stage="stage2"))
                                              if self.lifecycle is not None else None)

    def train_step(self) -> dict[str, float]:
        """One optimizer update on the next batch of conversations (loss on the assistant tokens)."""
        t0 = time.perf_counter()
        epoch, batch = self.sampler.next_batch()
        m = self.actor.train_step(batch, LossSpec("sft"))
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
