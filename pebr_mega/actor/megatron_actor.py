"""The Megatron actor: Qwen2.5-VL on Megatron-Core, trained over packed micro-batches.

One object per rank holds this rank's pipeline stage (and TP shard) of the model, wrapped in Megatron's
DistributedDataParallel, with Megatron's optimizer and learning-rate scheduler. It offers what the
trainers need and nothing else:

- `compute_logprobs(seqs, temperature)`: per-target log-probs (and entropies), no gradient;
- `train_step(seqs, loss)`: one optimizer update over a mini-batch (forward/backward through Megatron's
  pipeline schedule, gradient clipping, a non-finite loss or gradient skips the update);
- `named_full_weights()`: the weights as full (TP-merged, all-stage) Megatron tensors, for weight sync and
  export;
- `save(dir)` / `load(dir)`: Megatron distributed checkpoints (model + optimizer + scheduler).

Results of `compute_logprobs` and the loss are produced on the last pipeline stage and broadcast to every
rank of the pipeline, so every rank of the trainer sees the same numbers.

On CPU (tests, the demo) the very same code runs over gloo through `pebr_mega.parallel`'s compatibility
layer, with one difference: Megatron's DistributedOptimizer refuses non-CUDA tensors, so the plain Megatron
optimizer (`FP32Optimizer`) is used there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pebr_mega.actor.config import ActorConfig
from pebr_mega.actor.losses import LossScale, grpo_microbatch_loss, sft_microbatch_loss, target_logprobs
from pebr_mega.actor.packing import ActorSequence, MicroBatch, pack_micro_batches


@dataclass
class LossSpec:
    """Which loss a training step minimises: `grpo` (with the AlgoConfig and sampling temperature) or `sft`."""

    kind: str  # "grpo" | "sft"
    algo: object = None
    temperature: float = 1.0


class MegatronActor:
    """This rank's stage of the policy (or of the frozen reference when `trainable` is False)."""

    def __init__(self, model, model_cfg, cfg: ActorConfig, trainable: bool, total_updates: int = 1,
                 lr: float | None = None) -> None:
        from megatron.core import parallel_state as mpu

        self.model_cfg = model_cfg
        self.cfg = cfg
        self.trainable = trainable
        self.arch = model.arch
        self.tp_size = mpu.get_tensor_model_parallel_world_size()
        self.pp_size = mpu.get_pipeline_model_parallel_world_size()
        self.dp_size = mpu.get_data_parallel_world_size()
        self.dp_rank = mpu.get_data_parallel_rank()
        self.is_last_stage = mpu.is_pipeline_last_stage()
        self.tp_group = mpu.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        self.device = next(model.parameters()).device
        self.kernels_impl = self._resolve_kernels(cfg.kernels)
        # Micro-batches have different lengths: let the pipeline exchange shapes first.
        model.config.variable_seq_lengths = True
        self.optimizer = self.scheduler = None
        if trainable:
            self._freeze(model)
            self.model = self._wrap_ddp(model)
            self.optimizer, self.scheduler = self._build_optimizer(total_updates, lr if lr is not None else cfg.lr)
        else:
            for p in model.parameters():
                p.requires_grad_(False)
            self.model = model.eval()
        self.updates = 0

    # ------------------------------------------------------------------------------------------ build
    def _resolve_kernels(self, choice: str) -> str:
        if choice == "auto":
            return "triton" if self.device.type == "cuda" else "torch"
        return choice

    def _freeze(self, model) -> None:
        vision = getattr(model, "vision_model", None)
        if vision is None:
            return
        for name, p in vision.named_parameters():
            is_merger = name.startswith("merger.")
            if (self.cfg.freeze_projector and is_merger) or (self.cfg.freeze_vision and not is_merger):
                p.requires_grad_(False)

    def _wrap_ddp(self, model):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=self._distributed_optimizer())
        wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
        # Reduce gradients over DP (and tied embeddings over PP) once per step, in the schedule.
        model.config.finalize_model_grads_func = finalize_model_grads
        return wrapped

    def _distributed_optimizer(self) -> bool:
        if self.cfg.distributed_optimizer == "auto":
            return self.device.type == "cuda"
        return self.cfg.distributed_optimizer == "on"

    def _build_optimizer(self, total_updates: int, lr: float):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        dtype = self.model_cfg.torch_dtype
        opt_cfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=self.cfg.min_lr, weight_decay=self.cfg.weight_decay,
                                  adam_beta1=self.cfg.adam_beta1, adam_beta2=self.cfg.adam_beta2, adam_eps=self.cfg.adam_eps,
                                  clip_grad=self.cfg.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                  params_dtype=dtype, use_distributed_optimizer=self._distributed_optimizer())
        optimizer = get_megatron_optimizer(opt_cfg, [self.model])
        warmup = int(round(self.cfg.warmup_ratio * total_updates))
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0 if warmup else lr, max_lr=lr, min_lr=self.cfg.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=max(total_updates, 1), lr_decay_style=self.cfg.lr_schedule,
            start_wd=self.cfg.weight_decay, end_wd=self.cfg.weight_decay, wd_incr_steps=max(total_updates, 1),
            wd_incr_style="constant", override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False)
        return optimizer, scheduler

    @property
    def module(self):
        """The unwrapped Megatron model of this stage."""
        return self.model.module if hasattr(self.model, "module") else self.model

    # ------------------------------------------------------------------------------------------ inputs
    def positions(self, ids: list[int], grid: Tensor | None) -> Tensor:
        """M-RoPE positions [3, L] of one unpadded sequence."""
        from pebr_mega.models.rope_index import sample_positions

        v = self.arch.vision
        return sample_positions(ids, [g.tolist() for g in grid] if grid is not None else [], [], [],
                                image_token_id=self.arch.image_token_id, video_token_id=self.arch.video_token_id,
                                spatial_merge_size=v.spatial_merge_size, tokens_per_second=v.tokens_per_second)

    def micro_batches(self, seqs: Sequence[ActorSequence]) -> list[MicroBatch]:
        """Pack this rank's share of `seqs` into micro-batches of at most `micro_batch_tokens` tokens."""
        return pack_micro_batches(seqs, self.cfg.micro_batch_tokens, self.positions)

    def dp_share(self, seqs: Sequence[ActorSequence]) -> list[ActorSequence]:
        """The sequences this data-parallel rank processes (round robin; each rank has at least one)."""
        share = list(seqs[self.dp_rank::self.dp_size])
        if not share:
            raise ValueError(f"{len(seqs)} sequences cannot feed {self.dp_size} data-parallel ranks")
        return share

    def _model_inputs(self, mb: MicroBatch) -> dict:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = mb.cu_seqlens.to(self.device)
        inputs = {
            "input_ids": mb.input_ids.to(self.device),
            "position_ids": mb.position_ids.to(self.device),
            "packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                 max_seqlen_q=mb.max_seqlen, max_seqlen_kv=mb.max_seqlen),
        }
        if mb.pixel_values is not None:
            inputs["pixel_values"] = mb.pixel_values.to(self.device, self.model_cfg.torch_dtype)
            inputs["image_grid_thw"] = mb.image_grid_thw.to(self.device)
        return inputs

    # ------------------------------------------------------------------------------------------ schedule
    def _run(self, mbs: list[MicroBatch], loss_fn: Callable, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iter: Iterator[MicroBatch], model):
            mb = next(data_iter)
            out = model(**self._model_inputs(mb))
            return out, partial(loss_fn, mb)

        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(mbs), model=[self.model], num_microbatches=len(mbs),
            seq_length=max(mb.num_tokens for mb in mbs), micro_batch_size=1, forward_only=forward_only)

    def _broadcast_from_last_stage(self, obj):
        """Send a picklable result from the last pipeline stage to every stage of this pipeline."""
        if self.pp_size == 1:
            return obj
        from megatron.core import parallel_state as mpu

        box = [obj]
        dist.broadcast_object_list(box, src=mpu.get_pipeline_model_parallel_last_rank(),
                                   group=mpu.get_pipeline_model_parallel_group())
        return box[0]

    def _gather_dp(self, obj):
        """All data-parallel ranks' objects, in DP-rank order."""
        if self.dp_size == 1:
            return [obj]
        from megatron.core import parallel_state as mpu

        out = [None] * self.dp_size
        dist.all_gather_object(out, obj, group=mpu.get_data_parallel_group())
        return out

    # ------------------------------------------------------------------------------------------ API
    @torch.no_grad()
    def compute_logprobs(self, seqs: Sequence[ActorSequence], temperature: float = 1.0,
                         with_entropy: bool = False) -> list[tuple[Tensor, Tensor | None]]:
        """(log-probs, entropies) of every sequence's targets, in the order of `seqs`, on every rank."""
        indexed = [ActorSequence(**{**s.__dict__, "index": i}) for i, s in enumerate(seqs)]
        mbs = self.micro_batches(self.dp_share(indexed))
        self.model.eval()

        def loss_fn(mb, logits):
            lp, ent = target_logprobs(logits, mb, temperature, self.kernels_impl, self.tp_group, with_entropy)
            rows = {}
            for r, idx in enumerate(mb.indices):
                n = int(mb.target_mask[r].sum())
                rows[idx] = (lp[r, :n].float().cpu(), ent[r, :n].float().cpu() if ent is not None else None)
            return logits.new_zeros(()), rows

        outs = self._run(mbs, loss_fn, forward_only=True)
        local = {}
        if self.is_last_stage:
            for rows in outs:
                local.update(rows)
        local = self._broadcast_from_last_stage(local)
        merged = {}
        for part in self._gather_dp(local):
            merged.update(part)
        return [merged[i] for i in range(len(seqs))]

    def train_step(self, seqs: Sequence[ActorSequence], loss: LossSpec) -> dict[str, float]:
        """One optimizer update on the mini-batch `seqs` (all ranks pass the same list)."""
        if not self.trainable:
            raise RuntimeError("this actor is frozen (the reference model)")
        denominator = self._denominator(seqs, loss)
        mbs = self.micro_batches(self.dp_share(seqs))
        scale = LossScale(denominator, len(mbs), self.dp_size)
        if loss.kind == "grpo":
            loss_fn = lambda mb, logits: grpo_microbatch_loss(logits, mb, scale, loss.algo, loss.temperature,  # noqa: E731
                                                              self.kernels_impl, self.tp_group)
        else:
            loss_fn = lambda mb, logits: sft_microbatch_loss(logits, mb, scale, self.kernels_impl, self.tp_group)  # noqa: E731
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._run(mbs, loss_fn, forward_only=False)
        sums = self._sum_metrics(outs)
        metrics = self._step_optimizer(sums)
        tokens = max(sums.get("tokens", 0.0), 1.0)
        metrics["loss"] = sums.get("loss_sum", float("nan")) / denominator
        for k in ("pg_loss", "kl_loss"):
            if f"{k}_sum" in sums:
                metrics[k] = sums[f"{k}_sum"] / denominator
        for k in ("clip_frac", "clip_frac_dual", "approx_kl", "entropy"):
            if f"{k}_tok" in sums:
                metrics[k] = sums[f"{k}_tok"] / tokens
        metrics["train_tokens"] = sums.get("tokens", 0.0)
        return metrics

    def _denominator(self, seqs: Sequence[ActorSequence], loss: LossSpec) -> float:
        agg = getattr(loss.algo, "agg", "token-mean") if loss.kind == "grpo" else "token-mean"
        if agg == "token-mean":
            return float(sum(s.num_targets for s in seqs))
        return float(sum(1 for s in seqs if s.num_targets > 0))

    def _sum_metrics(self, outs: list[dict]) -> dict[str, float]:
        local: dict[str, float] = {}
        if self.is_last_stage:
            for d in outs:
                for k, v in d.items():
                    local[k] = local.get(k, 0.0) + float(v)
        local = self._broadcast_from_last_stage(local)
        total: dict[str, float] = {}
        for part in self._gather_dp(local):
            for k, v in part.items():
                total[k] = total.get(k, 0.0) + v
        return total

    def _step_optimizer(self, sums: dict[str, float]) -> dict[str, float]:
        """Clip and step, unless the loss or the gradient is not finite (then the update is skipped)."""
        loss_ok = math.isfinite(sums.get("loss_sum", 0.0))
        found_inf = self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if not loss_ok or found_inf or not math.isfinite(grad_norm):
            self.optimizer.zero_grad()
            return {"grad_norm": grad_norm, "skipped": 1.0, "lr": self.lr}
        if self.cfg.clip_grad > 0 and grad_norm > self.cfg.clip_grad:
            self._scale_grads(self.cfg.clip_grad / (grad_norm + 1e-6))
        self.optimizer.step_with_ready_grads()
        self.scheduler.step(increment=1)
        self.updates += 1
        return {"grad_norm": grad_norm, "skipped": 0.0, "lr": self.lr}

    # ------------------------------------------------------------------------------------------ checkpoints
    def _sharded_state(self, is_loading: bool = False) -> dict:
        model_sd = self.module.sharded_state_dict()
        state = {"model": model_sd}
        if self.optimizer is not None:
            # is_loading lets Megatron create the (lazily initialised) Adam moments to load into.
            state["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading)
        return state

    def save(self, ckpt_dir: str | Path) -> None:
        """Model, optimizer, scheduler and update count as a Megatron distributed checkpoint (collective)."""
        from megatron.core import dist_checkpointing

        ckpt_dir = Path(ckpt_dir)
        if not dist.is_initialized() or dist.get_rank() == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized():
            dist.barrier()
        dist_checkpointing.save(self._sharded_state(), str(ckpt_dir))
        if not dist.is_initialized() or dist.get_rank() == 0:
            extra = {"updates": self.updates, "scheduler": self.scheduler.state_dict() if self.scheduler else None}
            torch.save(extra, ckpt_dir / "actor_state.pt")
        if dist.is_initialized():
            dist.barrier()

    def load(self, ckpt_dir: str | Path) -> None:
        """Restore what `save` wrote (at any TP/PP for the model part)."""
        from megatron.core import dist_checkpointing

        state = dist_checkpointing.load(self._sharded_state(is_loading=True), str(ckpt_dir))
        self.module.load_state_dict(state["model"], strict=False)
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        extra = torch.load(Path(ckpt_dir) / "actor_state.pt", weights_only=False)
        self.updates = int(extra["updates"])
        if self.scheduler is not None and extra.get("scheduler"):
            self.scheduler.load_state_dict(extra["scheduler"])

    @torch.no_grad()
    def _scale_grads(self, coef: float) -> None:
        # Clipping by the global norm already computed above (over every model-parallel rank). Megatron's own
        # `clip_grad_norm` recomputes that norm and asserts CUDA tensors, so the scaling is done here.
        for p in self.optimizer.get_parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    @property
    def lr(self) -> float:
        """The current learning rate (0 for a frozen actor)."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0


def build_actor(path: str, model_cfg, cfg: ActorConfig, trainable: bool, total_updates: int = 1,
                lr: float | None = None) -> MegatronActor:
    """This rank's actor, with weights from an HF model directory (after `init_parallel`)."""
    from pebr_mega.checkpoint.hf_load import build_from_hf

    return MegatronActor(build_from_hf(path, model_cfg), model_cfg, cfg, trainable, total_updates, lr)
