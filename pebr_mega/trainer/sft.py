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
from typing import Any

from pebr_mega.actor.megatron_actor import LossSpec
from pebr_mega.actor.packing import ActorSequence
from pebr_mega.data.images import load_image, num_image_tokens
from pebr_mega.data.prompts import render_conversation
from pebr_mega.errors import DataError, ImageError
from pebr_mega.logging import read_metrics
from pebr_mega.trainer.data_order import EpochSampler
from pebr_mega.trainer.grpo import StageResult, _eval_line
from pebr_mega.trainer.session import Session


def load_sft_sequences(path: str | Path, tokenizer, decoder, image_root: str | Path, cutoff_len: int,
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


class SFTTrainer:
    """Runs `cfg.sft` from `cfg.sft.init_model` into `cfg.run.output_dir`."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        sft = cfg.sft
        self.session = Session(cfg, init_model=sft.init_model, train_file="", eval_file=cfg.data.eval_file or "",
                               stage="sft")
        s = self.session
        self.seqs, skipped = load_sft_sequences(sft.train_file, s.tokenizer, s.decoder,
                                                cfg.data.image_root or str(Path(sft.train_file).parent),
                                                sft.cutoff_len, cfg.images.merge_size)
        if skipped:
            print(f"sft data: kept {len(self.seqs)}, skipped {dict(skipped)}")
        if not self.seqs:
            raise DataError(f"{sft.train_file}: no usable SFT conversations")
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
