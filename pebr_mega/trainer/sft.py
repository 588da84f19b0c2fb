"""The SFT warm-up on the Megatron actor: ShareGPT conversations, loss on the assistant tokens only.

Upstream trains this stage with LLaMA-Factory (full fine-tune, lr 1e-5, warmup 0.1, cosine, 2 epochs,
cutoff 4096, vision tower and projector frozen); the same settings are `sft.*` here, so the whole recipe
runs in one framework. The data is read as LLaMA-Factory reads it (`pebr_mega.data.sft_records`): a
conversation longer than `sft.cutoff_len` tokens is truncated the way LLaMA-Factory truncates it, and counted.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from pebr_mega.actor.megatron_actor import LossSpec
from pebr_mega.actor.packing import ActorSequence
from pebr_mega.data.sft_records import SFTReport, encode_sft_file, resolve_sft_source
from pebr_mega.errors import DataError
from pebr_mega.logging import read_metrics
from pebr_mega.trainer.data_order import EpochSampler
from pebr_mega.trainer.grpo import StageResult, _eval_line
from pebr_mega.trainer.session import Session


def load_sft_sequences(path: str | Path, tokenizer, decoder, image_root: str | Path, cutoff_len: int,
                       merge_size: int = 2, **read_options) -> tuple[list[ActorSequence], SFTReport]:
    """Tokenised conversations with their images (`encode_sft_file`, whose keyword options pass through) and
    the report of skipped and truncated ones."""
    examples, report = encode_sft_file(path, tokenizer, decoder, image_root, cutoff_len, merge_size, **read_options)
    return [ActorSequence(e.input_ids, e.loss_mask, e.pixel_values, e.image_grid_thw, index=i)
            for i, e in enumerate(examples)], report


class SFTTrainer:
    """Runs `cfg.sft` from `cfg.sft.init_model` into `cfg.run.output_dir`."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        sft = cfg.sft
        self.session = Session(cfg, init_model=sft.init_model, train_file="", eval_file=cfg.data.eval_file or "",
                               stage="sft")
        s = self.session
        train_file, columns = resolve_sft_source(sft.train_file, sft.dataset_info, sft.dataset_name)
        self.seqs, skipped = load_sft_sequences(train_file, s.tokenizer, s.decoder,
                                                cfg.data.image_root or str(train_file.parent),
                                                sft.cutoff_len, cfg.images.merge_size, columns=columns,
                                                image_max_pixels=sft.image_max_pixels,
                                                image_min_pixels=sft.image_min_pixels)
        if skipped:
            print(f"sft data: {skipped}")
        if not self.seqs:
            raise DataError(f"{train_file}: no usable SFT conversations")
        self.skipped = skipped
        s.sampler = EpochSampler(self.seqs, sft.batch_size, seed=cfg.run.seed)
        self.total_steps = s.sampler.steps_per_epoch() * sft.epochs
        actor_cfg = dataclasses.replace(cfg.actor, lr=sft.lr, warmup_ratio=sft.warmup_ratio, lr_schedule=sft.lr_schedule,
                                        freeze_vision=sft.freeze_vision, freeze_projector=sft.freeze_projector)
        s.checkpoints.keep_last = sft.keep_last
        s.build_actors(total_updates=self.total_steps, with_reference=False, lr=sft.lr, actor_cfg=actor_cfg)
        if s.eval_records:
            s.build_engine()
            s.build_rewards(dataclasses.replace(cfg.rewards, stage="stage2"))

    def train(self) -> StageResult:
        """All epochs (resuming from the newest checkpoint), then evaluation and export."""
        s, sft = self.session, self.cfg.sft
        step = s.maybe_resume()
        logger = s.make_logger(self.total_steps, desc="sft")
        result = StageResult(model_dir=str(s.out_dir / "hf"), steps=self.total_steps)
        result.eval_before = s.load_or_run_eval("eval_before") if s.engine is not None else {}
        if result.eval_before:
            logger.message(_eval_line("before", result.eval_before))
        try:
            while step < self.total_steps:
                t0 = time.perf_counter()
                epoch, batch = s.sampler.next_batch()
                m = s.actor.train_step(batch, LossSpec("sft"))
                step += 1
                m["epoch"] = epoch
                m["time/step"] = time.perf_counter() - t0
                tokens = sum(len(q.input_ids) for q in batch)
                m["tokens_per_s"] = tokens / m["time/step"]
                m.update(s.flops_metrics(train_tokens=tokens, forward_tokens=0, seconds=m["time/step"]))
                logger.log(step, m)
                if sft.save_every and step % sft.save_every == 0:
                    s.save(step)
        except KeyboardInterrupt:
            logger.message(f"interrupted: saving step {step}")
            s.save(step)
            logger.close()
            raise
        if s.engine is not None:
            s.sync_engine()
            result.eval_after = s.run_eval()
            logger.message(_eval_line("after", result.eval_after))
        losses = [r["loss"] for r in read_metrics(s.out_dir / "metrics.jsonl") if r.get("loss") is not None]
        if losses:
            result.first_loss, result.last_loss = losses[0], losses[-1]
        logger.close()
        s.export(result.model_dir)
        (s.out_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        return result
