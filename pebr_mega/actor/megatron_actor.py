"""The Megatron actor: Qwen2.5-VL on Megatron-Core, trained over packed micro-batches.

One object per rank holds this rank's pipeline stage (and TP shard) of the model, wrapped in Megatron's
DistributedDataParallel, with Megatron's optimizer and learning-rate scheduler. It offers what the
trainers need and nothing else:

- `compute_logprobs(seqs, temperature)`: per-target log-probs (and entropies), no gradient;
- `train_step(seqs, loss)`: one optimizer update over a mini-batch (forward/backward through Megatron's
  pipeline schedule, gradient clipping, a non-finite loss or gradient skips the update);
- `save(dir)` / `load(dir)`: actor checkpoints (model + optimizer + scheduler + update counter) in Megatron's
  distributed format, loadable at another TP/PP layout; `build_actor(path, ...)` builds an actor from an HF
  directory, a Megatron checkpoint or an actor checkpoint.

The weights go to the rollout engine through `pebr_mega.rollout.weight_sync.sync_weights(actor.module, ...)`.

An actor checkpoint directory:

    <dir>/model/       a `pebr_mega.checkpoint.dist` checkpoint of the weights (pebr_mcore.json, hf_template/):
                       `tools/export_to_hf.py --mcore-dir <dir>/model` exports it, `build_actor(<dir>/model)`
                       starts a fresh optimizer from it
    <dir>/optimizer/   Megatron's distributed checkpoint of `optimizer.sharded_state_dict(...)` (Adam moments
                       and step, keyed by the model's global tensors, so it reshards to another TP/PP too)
    <dir>/actor.json   format tag, update counter, learning-rate scheduler state, the layout that saved it

It is written into `.<dir>.tmp` by all ranks and renamed into place by rank 0 after a barrier, so a crash
mid-save leaves the previous checkpoint untouched.

Results of `compute_logprobs` and the loss are produced on the last pipeline stage and broadcast to every
rank of the pipeline, so every rank of the trainer sees the same numbers.

On CPU (tests, the demo) the very same code runs over gloo through `pebr_mega.parallel`'s compatibility
layer, entered by the public methods above (`megatron_on_cpu`) and left when they return, with one difference: Megatron's DistributedOptimizer refuses non-CUDA tensors, so the plain Megatron
optimizer (`FP32Optimizer`) is used there.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pebr_mega.actor.config import ActorConfig, logprobs_path
from pebr_mega.actor.losses import LossScale, grpo_microbatch_loss, sft_microbatch_loss, target_logprobs
from pebr_mega.actor.packing import ActorSequence, MicroBatch, pack_micro_batches, plan_micro_batches, plan_stats
from pebr_mega.checkpoint.dist import META_FILE, TEMPLATE_DIR, load_checkpoint, read_meta, save_checkpoint
from pebr_mega.checkpoint.hf_io import HFWeights, replace_dir
from pebr_mega.checkpoint.hf_load import build_from_hf
from pebr_mega.checkpoint.hf_mapping import canonical_mcore_name, tp_split_dim
from pebr_mega.checkpoint.manifest import verify_before_reading
from pebr_mega.errors import CheckpointError
from pebr_mega.models.arch import arch_from_hf_config
from pebr_mega.models.config import ModelConfig, token_multiple
from pebr_mega.models.packing import packed_seq_params
from pebr_mega.models.qwen25_vl import build_model
from pebr_mega.models.rope_index import sample_positions
from pebr_mega.parallel.cpu_compat import megatron_on_cpu
from pebr_mega.parallel.groups import barrier, is_main_rank

ACTOR_META = "actor.json"
ACTOR_FORMAT = "pebr-actor/1"
MODEL_DIR = "model"
OPTIMIZER_DIR = "optimizer"


@dataclass
class LossSpec:
    """Which loss a training step minimises: `grpo` (with the AlgoConfig and sampling temperature) or `sft`."""

    kind: str  # "grpo" | "sft"
    algo: object = None
    temperature: float = 1.0
    # GRPO only: the old policy is the one being updated (the step's single update, PPO epochs 1), so the
    # sequences carry no old log-probs and the update's own forward gives them (detached).
    on_policy: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("grpo", "sft"):
            raise ValueError(f"LossSpec.kind must be 'grpo' or 'sft', got {self.kind!r}")
        if self.kind == "grpo" and self.algo is None:
            raise ValueError("LossSpec('grpo') needs the AlgoConfig (algo=...)")
        if self.on_policy and self.kind != "grpo":
            raise ValueError("LossSpec.on_policy is a GRPO setting")


def fused_adam_available() -> bool:
    """Whether Megatron builds its optimizers on Transformer Engine's or Apex's FusedAdam (not torch's AdamW)."""
    try:
        from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE
    except ImportError:
        return False
    return bool(HAVE_APEX_OR_TE)


class MegatronActor:
    """This rank's stage of the policy (or of the frozen reference when `trainable` is False).

    `source` is where the weights came from (an HF directory, a Megatron checkpoint or an actor checkpoint);
    `save` reads the HF config and the tokenizer/processor files to record beside the weights from it.
    """

    def __init__(self, model, model_cfg: ModelConfig, cfg: ActorConfig, trainable: bool, total_updates: int = 1,
                 lr: float | None = None, source: str | Path | None = None) -> None:
        from megatron.core import parallel_state as mpu

        self.model_cfg = model_cfg
        self.cfg = cfg
        self.trainable = trainable
        self.source = Path(source) if source is not None else None
        self.arch = model.arch
        self.tp_size = mpu.get_tensor_model_parallel_world_size()
        self.pp_size = mpu.get_pipeline_model_parallel_world_size()
        self.dp_size = mpu.get_data_parallel_world_size()
        self.dp_rank = mpu.get_data_parallel_rank()
        self.is_last_stage = mpu.is_pipeline_last_stage()
        self.tp_group = mpu.get_tensor_model_parallel_group() if self.tp_size > 1 else None
        self.device = next(model.parameters()).device
        self.kernels_impl = self._resolve_kernels(cfg.kernels)
        self.logprobs_from = logprobs_path(cfg.logprobs_from, self.device.type)
        # Every packed row is padded to this many tokens (FP8 GEMMs; sequence-parallel splits): models.packing.
        self.token_multiple = token_multiple(self.tp_size, bool(model.config.sequence_parallel))
        # Micro-batches have different lengths: let the pipeline exchange shapes first.
        model.config.variable_seq_lengths = True
        self.optimizer = self.scheduler = None
        if trainable:
            self._freeze(model)
            _mark_tensor_parallel_params(model)
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
        from megatron.core.distributed import (DistributedDataParallel, DistributedDataParallelConfig,
                                               finalize_model_grads)

        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=self._distributed_optimizer())
        wrapped = DistributedDataParallel(config=model.config, ddp_config=ddp_cfg, module=model)
        # Reduce gradients over DP (and tied embeddings over PP) once per step, in the schedule.
        model.config.finalize_model_grads_func = finalize_model_grads
        return wrapped

    def _distributed_optimizer(self) -> bool:
        """Whether Megatron's distributed optimizer runs (see `ActorConfig.distributed_optimizer`)."""
        usable = self.device.type == "cuda" and fused_adam_available()
        if self.cfg.distributed_optimizer == "auto":
            return usable
        if self.cfg.distributed_optimizer == "on" and not usable:
            raise ValueError(
                "actor.distributed_optimizer=on needs CUDA and a fused Adam (Transformer Engine or Apex): "
                "Megatron's distributed optimizer refuses CPU tensors, and with torch's AdamW (no per-group "
                "step) megatron-core 0.16 saves its state but cannot load it back. Use "
                "actor.distributed_optimizer=auto or off, or install transformer-engine")
        return self.cfg.distributed_optimizer == "on"

    def _build_optimizer(self, total_updates: int, lr: float):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        dtype = self.model_cfg.torch_dtype
        opt_cfg = OptimizerConfig(optimizer="adam", lr=lr, min_lr=self.cfg.min_lr, weight_decay=self.cfg.weight_decay,
                                  adam_beta1=self.cfg.adam_beta1, adam_beta2=self.cfg.adam_beta2, adam_eps=self.cfg.adam_eps,
                                  clip_grad=self.cfg.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                                  params_dtype=dtype, use_distributed_optimizer=self._distributed_optimizer(),
                                  decoupled_weight_decay=True)
        optimizer = get_megatron_optimizer(opt_cfg, [self.model], **self._weight_decay_kwargs(get_megatron_optimizer))
        warmup = int(round(self.cfg.warmup_ratio * total_updates))
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0 if warmup else lr, max_lr=lr, min_lr=self.cfg.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=max(total_updates, 1), lr_decay_style=self.cfg.lr_schedule,
            start_wd=self.cfg.weight_decay, end_wd=self.cfg.weight_decay, wd_incr_steps=max(total_updates, 1),
            wd_incr_style="constant", override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False)
        return optimizer, scheduler

    def _weight_decay_kwargs(self, get_megatron_optimizer) -> dict:
        """Arguments of `get_megatron_optimizer` that choose which parameters get weight decay.

        Without them Megatron exempts biases and 1-D parameters. Megatron-Core >= 0.15 takes
        `config_overrides` (an empty dict = no override = decay everywhere); older releases take
        `no_weight_decay_cond(name, param)`.
        """
        import inspect

        if not self.cfg.decay_all_params:
            return {}
        params = inspect.signature(get_megatron_optimizer).parameters
        if "config_overrides" in params:
            return {"config_overrides": {}}
        return {"no_weight_decay_cond": lambda name, param: False}

    @property
    def module(self):
        """The unwrapped Megatron model of this stage."""
        return self.model.module if hasattr(self.model, "module") else self.model

    # ------------------------------------------------------------------------------------------ inputs
    def positions(self, ids: list[int], grid: Tensor | None) -> Tensor:
        """M-RoPE positions [3, L] of one unpadded sequence."""
        v = self.arch.vision
        return sample_positions(ids, [g.tolist() for g in grid] if grid is not None else [], [], [],
                                image_token_id=self.arch.image_token_id, video_token_id=self.arch.video_token_id,
                                spatial_merge_size=v.spatial_merge_size, tokens_per_second=v.tokens_per_second)

    def plan(self, seqs: Sequence[ActorSequence]) -> list[list[list[int]]]:
        """Balanced micro-batches of `seqs` for every data-parallel rank (`actor.packing.plan_micro_batches`)."""
        return plan_micro_batches([len(s.input_ids) for s in seqs], self.cfg.micro_batch_tokens, self.dp_size)

    def micro_batches(self, seqs: Sequence[ActorSequence], plan: list[list[list[int]]] | None = None) -> list[MicroBatch]:
        """This rank's packed, padded micro-batches of `seqs` (all ranks pass the same list)."""
        plan = self.plan(seqs) if plan is None else plan
        pad_id = 0 if self.arch.image_token_id != 0 and self.arch.video_token_id != 0 else 1
        return pack_micro_batches(seqs, self.cfg.micro_batch_tokens, self.positions, self.dp_size, self.dp_rank,
                                  self.token_multiple, pad_id, plan=plan)

    def _model_inputs(self, mb: MicroBatch) -> dict:
        dev = self.device
        inputs = {
            "input_ids": mb.input_ids.to(dev, non_blocking=True),
            "position_ids": mb.position_ids.to(dev, non_blocking=True),
            "packed_seq_params": packed_seq_params(mb.lengths, self.module.spec, dev),
            "target_index": mb.target_index.to(dev, non_blocking=True),
        }
        if mb.pixel_values is not None:
            inputs["pixel_values"] = mb.pixel_values.to(dev, self.model_cfg.torch_dtype, non_blocking=True)
            inputs["image_grid_thw"] = mb.image_grid_thw  # host metadata: the vision tower plans from it there
        return inputs

    # ------------------------------------------------------------------------------------------ schedule
    def _run(self, mbs: list[MicroBatch], loss_fn: Callable, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def step(data_iter: Iterator[MicroBatch], model):
            mb = next(data_iter)
            out = model(**self._model_inputs(mb))  # last stage: the target positions' hidden states [N, h]
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
    @megatron_on_cpu
    @torch.no_grad()
    def compute_logprobs(self, seqs: Sequence[ActorSequence], temperature: float = 1.0,
                         with_entropy: bool = False) -> list[tuple[Tensor, Tensor | None]]:
        """(log-probs, entropies) of every sequence's targets, in the order of `seqs`, on every rank.

        Log-probs are log softmax(logits / temperature) of the target tokens (float32, on CPU); entropies are
        those of the same distribution (None unless `with_entropy`). Collective over all ranks, which must
        pass the same list; a data-parallel rank left without sequences just takes part in the exchange.
        """
        indexed = [ActorSequence(**{**s.__dict__, "index": i}) for i, s in enumerate(seqs)]
        mbs = self.micro_batches(indexed)
        self.model.eval()

        def loss_fn(mb, hidden):
            lp, ent = target_logprobs(hidden, self.module.output_weight(), mb, temperature, self.kernels_impl,
                                      self.logprobs_from, self.tp_group, with_entropy)
            counts = [s.num_targets for s in (indexed[i] for i in mb.indices)]
            lps = torch.split(lp.float().cpu(), counts)  # one copy to the host per micro-batch
            ents = torch.split(ent.float().cpu(), counts) if ent is not None else [None] * len(counts)
            return hidden.new_zeros(()), dict(zip(mb.indices, zip(lps, ents)))

        outs = self._run(mbs, loss_fn, forward_only=True) if mbs else []
        local = {}
        if self.is_last_stage:
            for rows in outs:
                local.update(rows)
        local = self._broadcast_from_last_stage(local)
        merged = {}
        for part in self._gather_dp(local):
            merged.update(part)
        return [merged[i] for i in range(len(seqs))]

    @megatron_on_cpu
    def train_step(self, seqs: Sequence[ActorSequence], loss: LossSpec) -> dict[str, float]:
        """One optimizer update on the mini-batch `seqs` (all ranks pass the same list); returns metrics.

        Metrics: `loss` (and `pg_loss`, `kl_loss` for GRPO) normalised over the whole mini-batch, token means
        `clip_frac`, `clip_frac_dual`, `approx_kl`, `entropy`, the pre-clip `grad_norm`, `lr`, `train_tokens`
        and `skipped` (1 when a non-finite loss or gradient left the weights, the optimizer state and the
        schedule untouched); `mismatch/token_mult_prob_error` against the sequences' `rollout_logprobs` when
        they carry some (this update's log-probs: the old policy's only when it is on policy).
        """
        if not self.trainable:
            raise RuntimeError("this actor is frozen (the reference model)")
        if len(seqs) < self.dp_size:
            raise ValueError(f"{len(seqs)} sequences cannot feed {self.dp_size} data-parallel ranks")
        self._check_loss_inputs(seqs, loss)
        agg = getattr(loss.algo, "agg", "token-mean") if loss.kind == "grpo" else "token-mean"
        denominator = self._denominator(seqs, agg)
        plan = self.plan(seqs)
        mbs = self.micro_batches(seqs, plan)
        scale = LossScale(denominator, len(mbs), self.dp_size, per_microbatch=agg == "token-mean-microbatch")
        weight = self.module.output_weight if self.is_last_stage else None
        if loss.kind == "grpo":
            def loss_fn(mb, hidden):
                return grpo_microbatch_loss(hidden, weight(), mb, scale, loss.algo, loss.temperature,
                                            self.kernels_impl, self.logprobs_from, self.tp_group)
        else:
            def loss_fn(mb, hidden):
                return sft_microbatch_loss(hidden, weight(), mb, scale, self.kernels_impl, self.logprobs_from,
                                           self.tp_group)
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outs = self._run(mbs, loss_fn, forward_only=False)
        sums = self._sum_metrics(outs)
        metrics = self._step_optimizer(sums)
        tokens = max(sums.get("tokens", 0.0), 1.0)
        metrics["loss"] = sums.get("loss_sum", float("nan"))
        for k in ("pg_loss", "kl_loss"):
            if f"{k}_sum" in sums:
                metrics[k] = sums[f"{k}_sum"]
        for k in ("clip_frac", "clip_frac_dual", "approx_kl", "entropy"):
            if f"{k}_tok" in sums:
                metrics[k] = sums[f"{k}_tok"] / tokens
        metrics["train_tokens"] = sums.get("tokens", 0.0)
        if sums.get("mismatch_tokens", 0.0) > 0:
            metrics["mismatch/token_mult_prob_error"] = sums["mismatch_exp_sum"] / sums["mismatch_tokens"]
        stats = plan_stats(plan, [len(s.input_ids) for s in seqs], self.token_multiple)
        metrics.update({f"actor/{k}": v for k, v in stats.items()})
        return metrics

    @staticmethod
    def _check_loss_inputs(seqs: Sequence[ActorSequence], loss: LossSpec) -> None:
        if loss.kind != "grpo":
            return
        need_ref = getattr(loss.algo, "kl_coef", 0.0) > 0
        for i, s in enumerate(seqs):
            if loss.on_policy and s.old_logprobs is not None:
                raise ValueError(f"sequence {i}: an on-policy update computes its own old log-probs; this one "
                                 "carries some (drop them, or use LossSpec(on_policy=False))")
            if not loss.on_policy and s.old_logprobs is None:
                raise ValueError(f"sequence {i}: GRPO needs old_logprobs (compute_logprobs before the update)")
            if need_ref and s.ref_logprobs is None:
                raise ValueError(f"sequence {i}: algo.kl_coef > 0 needs ref_logprobs (from the reference actor)")

    @staticmethod
    def _denominator(seqs: Sequence[ActorSequence], agg: str) -> float:
        if agg in ("token-mean", "token-mean-microbatch"):
            return float(sum(s.num_targets for s in seqs))
        return float(sum(1 for s in seqs if s.num_targets > 0))

    def _sum_metrics(self, outs: list[dict]) -> dict[str, float]:
        local: dict[str, float] = {}
        if self.is_last_stage and outs:
            keys = sorted({k for d in outs for k in d})  # an empty micro-batch reports fewer metrics
            # summed on the device, read back once per step
            totals = torch.stack([torch.stack([d[k].float() for d in outs if k in d]).sum() for k in keys]).tolist()
            local = dict(zip(keys, totals))
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
        # torch.nn.utils.clip_grad_norm_'s (and Megatron's) rule, with the norm computed once above.
        coef = self.cfg.clip_grad / (grad_norm + 1e-6)
        if self.cfg.clip_grad > 0 and coef < 1.0:
            self._scale_grads(coef)
        self.optimizer.step_with_ready_grads()
        self.scheduler.step(increment=1)
        self.updates += 1
        return {"grad_norm": grad_norm, "skipped": 0.0, "lr": self.lr}

    @torch.no_grad()
    def _scale_grads(self, coef: float) -> None:
        # Clipping by the global norm already computed above (over every model-parallel rank). Megatron's own
        # `clip_grad_norm` recomputes that norm and asserts CUDA tensors, so the scaling is done here.
        for p in self.optimizer.get_parameters():
            if p.grad is not None:
                p.grad.mul_(coef)

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every weight of the model is finite, on every rank (collective: one all-reduce)."""
        params = [p for p in self.module.parameters() if p.numel()]
        ok = torch.stack([torch.isfinite(p).all() for p in params]).all() if params else torch.tensor(True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = ok.to(device=device, dtype=torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            return bool(flag.item())
        return bool(ok)

    @property
    def lr(self) -> float:
        """The current learning rate (0 for a frozen actor)."""
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else 0.0

    # ------------------------------------------------------------------------------------------ checkpoints
    @megatron_on_cpu
    def save(self, ckpt_dir: str | Path) -> Path:
        """Write an actor checkpoint (layout in the module docstring) to `ckpt_dir`; collective over all ranks.

        A frozen actor writes the weights only.
        """
        from megatron.core import dist_checkpointing

        meta, template = self._checkpoint_meta()
        final = Path(ckpt_dir)
        tmp = final.parent / f".{final.name}.tmp"
        if is_main_rank():
            if tmp.exists():
                shutil.rmtree(tmp)
            (tmp / OPTIMIZER_DIR).mkdir(parents=True)
        barrier()
        save_checkpoint(self.module, tmp / MODEL_DIR, meta, template_dir=template)
        if self._has_optimizer_state():
            dist_checkpointing.save(self._optimizer_sharded_state(is_loading=False), str(tmp / OPTIMIZER_DIR))
        barrier()
        if is_main_rank():
            if self.optimizer is None:
                (tmp / OPTIMIZER_DIR).rmdir()
            record = {"format": ACTOR_FORMAT, "updates": self.updates, "trainable": self.trainable,
                      "optimizer_state": self._has_optimizer_state(),
                      "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                      "saved_tp": self.tp_size, "saved_pp": self.pp_size, "saved_dp": self.dp_size,
                      "distributed_optimizer": self._distributed_optimizer() if self.trainable else None}
            (tmp / ACTOR_META).write_text(json.dumps(record, indent=2, default=str) + "\n")
            replace_dir(tmp, final)
        barrier()
        return final

    @megatron_on_cpu
    def load(self, ckpt_dir: str | Path) -> dict:
        """Load an actor checkpoint (weights, and optimizer + schedule + update counter when trainable).

        Works at any TP/PP layout; collective over all ranks. Returns the checkpoint's `actor.json` record.
        """
        record = read_actor_meta(ckpt_dir)
        load_checkpoint(self.module, Path(ckpt_dir) / MODEL_DIR)
        self._load_training_state(ckpt_dir, record)
        return record

    def _has_optimizer_state(self) -> bool:
        """Whether the optimizer holds a state to save: Adam creates its moments at the first applied update, so
        before one (every update so far skipped as non-finite, or none run) there is none. Megatron saves such
        an optimizer as an empty dictionary that no optimizer can load (its loader asks for every moment), so
        that checkpoint records `optimizer_state: false` instead and its load keeps the fresh optimizer, which
        is exactly the saved one."""
        return self.optimizer is not None and self.updates > 0

    def _load_training_state(self, ckpt_dir: str | Path, record: dict) -> None:
        from megatron.core import dist_checkpointing

        self.updates = int(record["updates"])
        if self.optimizer is None:
            return
        opt_dir = Path(ckpt_dir) / OPTIMIZER_DIR
        if record.get("trainable") is False or record.get("scheduler") is None:
            raise CheckpointError(f"{ckpt_dir}: no optimizer state (saved by a frozen actor); "
                                  f"build a trainable actor from {Path(ckpt_dir) / MODEL_DIR} to start a fresh optimizer")
        if self.updates == 0 and record.get("optimizer_state") in (False, None):
            # Saved before the first applied update (`optimizer_state` false; a checkpoint written before that
            # key existed had an empty state too): the optimizer had no state, as this fresh one has none.
            self.scheduler.load_state_dict(record["scheduler"])
            return
        if not opt_dir.is_dir():
            raise CheckpointError(f"{opt_dir}: the optimizer state is missing")
        if record.get("distributed_optimizer") not in (None, self._distributed_optimizer()):
            raise CheckpointError(f"{ckpt_dir}: optimizer state was saved with distributed_optimizer="
                                  f"{record['distributed_optimizer']}, this actor runs with {self._distributed_optimizer()}")
        try:
            state = dist_checkpointing.load(self._optimizer_sharded_state(is_loading=True), str(opt_dir))
        except Exception as e:  # Megatron raises several exception types for missing keys and shape mismatches
            raise CheckpointError(f"{opt_dir}: cannot load the optimizer state: {type(e).__name__}: {e}") from None
        self.optimizer.load_state_dict(state)
        # After the optimizer (whose param groups carry the saved lr): the schedule sets the lr of its step.
        self.scheduler.load_state_dict(record["scheduler"])

    def _optimizer_sharded_state(self, is_loading: bool) -> dict:
        # Megatron's default layout for the distributed optimizer ('fully_sharded_model_space') is deprecated
        # and refused by megatron-core 0.16 on save ("flattened_range is not supported", seen on an H100);
        # 'fully_reshardable' stores each parameter's Adam state in its model shape, so the checkpoint loads
        # at any TP/PP/DP, as the plain optimizer's does. The non-distributed optimizers ignore the key.
        metadata = {"distrib_optim_sharding_type": "fully_reshardable"}
        return self.optimizer.sharded_state_dict(self.module.sharded_state_dict(), is_loading=is_loading,
                                                 metadata=metadata)

    def _checkpoint_meta(self) -> tuple[dict, Path | None]:
        """The `pebr_mcore.json` record and HF template directory for the weights, from `self.source`."""
        if self.source is None:
            raise CheckpointError("the actor does not know its HF config: build it with build_actor(path, ...) "
                                  "or pass source=<HF dir or checkpoint> to MegatronActor")
        kind = checkpoint_kind(self.source)
        if kind == "hf":
            hf_config = json.loads((self.source / "config.json").read_text())
            return ({"hf_config": hf_config, "hf_key_style": HFWeights(self.source).key_style,
                     "dtype": self.model_cfg.params_dtype, "source": str(self.source.resolve())}, self.source)

        mcore = self.source / MODEL_DIR if kind == "actor" else self.source
        meta = {k: v for k, v in read_meta(mcore).items() if k not in ("format", "saved_tp", "saved_pp")}
        meta["dtype"] = self.model_cfg.params_dtype
        template = mcore / TEMPLATE_DIR
        return meta, template if template.is_dir() else None


# ---------------------------------------------------------------------------------------------- building
def _mark_tensor_parallel_params(model) -> None:
    """Tag TP-sharded weights with Megatron's `tensor_model_parallel` attributes where Megatron did not.

    WHY: Megatron-Core (0.16) sets `tensor_model_parallel` on a column/row-parallel *weight* only inside its
    random initialisers, which do not run when the model is built with `perform_initialization=False` to
    be filled from a checkpoint (biases are tagged either way). Megatron's grad-norm then takes an untagged
    shard for a TP replica and counts it on TP rank 0 only: at TP=2 the norm, and so the clipping, came out
    wrong (2.24 instead of 2.95 on the tiny model). The split dims come from the one HF mapping.
    """
    for name, p in model.named_parameters():
        dim = tp_split_dim(canonical_mcore_name(model.global_name(name)))
        if dim is not None and not getattr(p, "tensor_model_parallel", False):
            p.tensor_model_parallel = True
            p.partition_dim = dim
            p.partition_stride = 1


def read_actor_meta(ckpt_dir: str | Path) -> dict:
    """The `actor.json` record of an actor checkpoint; anything else is a CheckpointError naming the path."""
    path = Path(ckpt_dir) / ACTOR_META
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {ckpt_dir} is not an actor checkpoint")
    record = json.loads(path.read_text())
    if record.get("format") != ACTOR_FORMAT:
        raise CheckpointError(f"{path}: format {record.get('format')!r}, expected {ACTOR_FORMAT!r}")
    return record


def checkpoint_kind(path: str | Path) -> str:
    """`"actor"`, `"mcore"` or `"hf"`: what kind of model directory `path` is; CheckpointError otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: model directory not found")
    if (p / ACTOR_META).is_file():
        return "actor"
    if (p / META_FILE).is_file():
        return "mcore"
    if (p / "config.json").is_file() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()):
        return "hf"
    raise CheckpointError(f"{p}: neither an HF model directory (config.json + *.safetensors), a Megatron checkpoint "
                          f"({META_FILE}) nor an actor checkpoint ({ACTOR_META})")


@megatron_on_cpu
def build_actor(path: str | Path, model_cfg: ModelConfig, actor_cfg: ActorConfig, trainable: bool = True, total_updates: int = 1,
                lr: float | None = None, verify: bool = True) -> MegatronActor:
    """An actor for this rank (TP/PP as initialised by `init_parallel`) from any kind of model directory.

    - HF directory: the HF weights, a fresh optimizer;
    - Megatron checkpoint (`convert_hf_to_mcore` output, or an actor checkpoint's `model/`): its weights, a
      fresh optimizer;
    - actor checkpoint: weights, and (when `trainable`) optimizer state, schedule and update counter, so
      training resumes exactly where it stopped.
    A checkpoint is checked against its manifest first (`verify`, on rank 0; `pebr_mega.checkpoint.manifest`).
    Collective over all ranks.
    """
    from megatron.core import parallel_state as mpu

    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "hf":
        model = build_from_hf(path, model_cfg)
    else:
        if verify and is_main_rank():  # a damaged checkpoint stops here (every rank stops with the job)
            verify_before_reading(path, "model")
        layout = (mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size())
        if layout != (model_cfg.tp, model_cfg.pp):
            raise ValueError(f"process groups are tp={layout[0]} pp={layout[1]} but the config asks "
                             f"tp={model_cfg.tp} pp={model_cfg.pp}")
        mcore = path / MODEL_DIR if kind == "actor" else path
        arch = arch_from_hf_config(read_meta(mcore)["hf_config"], str(mcore))
        model = build_model(arch, model_cfg, pre_process=mpu.is_pipeline_first_stage(),
                            post_process=mpu.is_pipeline_last_stage())
        load_checkpoint(model, mcore)
    actor = MegatronActor(model, model_cfg, actor_cfg, trainable, total_updates, lr, source=path)
    if kind == "actor":
        actor._load_training_state(path, read_actor_meta(path))
    return actor
