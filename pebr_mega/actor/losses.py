"""Per-micro-batch losses of the actor: GRPO (PPO-clip + KL) and SFT (next-token cross-entropy).

Both start from the final hidden states of the target positions only ([N, h], `Qwen25VLModel` with
`target_index`) and the output layer's weight ([V / tp, h]); the log-probs of the N targets come from one of
two paths (`ActorConfig.logprobs_from`):

- `logits`: the target logits [N, V / tp] (one matmul, in the model dtype), then the fused log-prob kernel
  (vocab-parallel; its backward overwrites the logits in place). N counts trained tokens only: no logits of
  prompt tokens ever exist.
- `hidden`: `kernels.linear_logprobs`, chunked so that even the target logits never exist whole; its
  backward recomputes each chunk (8 instead of 6 N h V FLOPs): less memory, more FLOPs.
`auto` takes the per-device default in `LOGPROBS_FROM_DEFAULT` (actor/config.py), set from the H100 kernel measurements in
docs/PERFORMANCE.md; `tools/bench_grpo_step.py` times both paths at the benchmark's target count.

Normalisation across micro-batches and data-parallel ranks. The loss of a whole mini-batch is
    L = sum over micro-batches m (on every rank) of c_m,
with c_m the micro-batch's share: for the global modes (`token-mean`, `seq-mean-*`, SFT's token mean)
c_m = S_m / D, S_m the micro-batch's unnormalised aggregate (token-loss sum, sum of per-sequence means, ...)
and D the mini-batch's denominator (its target tokens, or its sequences), known before the step; for
`token-mean-microbatch` (upstream PeBR-R1's EasyR1 0.3.2.dev0 fork) c_m = (S_m / n_m) / (M * dp), the micro-batch's
own token mean over the M micro-batches and dp ranks. Megatron's schedule divides each returned loss by
M and DDP averages gradients over the DP ranks, so each micro-batch returns c_m * M * dp and the gradient
is exactly dL/dθ. Every rank runs the same M (`actor.packing`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pebr_mega.kernels import ops as kernels
from pebr_mega.actor.packing import MicroBatch
from pebr_mega.algo.mismatch import exp_gap_sums
from pebr_mega.kernels import reference
from pebr_mega.kernels.reference import grpo_loss_reference


@dataclass
class LossScale:
    """The numbers that turn a micro-batch aggregate into its share of the mini-batch loss."""

    denominator: float  # D: target tokens (token-mean, SFT) or sequences (seq-mean-*) of the whole mini-batch
    num_microbatches: int  # M, the same on every rank
    dp_size: int
    per_microbatch: bool = False  # token-mean-microbatch: each micro-batch's own token mean

    @property
    def returned(self) -> float:
        """What a share is multiplied by before the schedule (/ M) and DDP (/ dp) undo it: M * dp."""
        return float(self.num_microbatches * self.dp_size)


def target_logprobs(hidden: Tensor, weight: Tensor, mb: MicroBatch, temperature: float, kernels_impl: str,
                    path: str = "logits", tp_group=None, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) [N] float32 of the micro-batch's targets, in `target_index` order.

    `hidden` [N, h] are the final hidden states of the positions predicting the targets, `weight` [V / tp, h]
    this rank's slice of the output layer. With `tp_group` the hidden-state gradient is all-reduced over it
    (as Megatron's column-parallel output layer does).
    """
    if mb.num_targets == 0:  # an empty (padding-only) micro-batch: a zero that keeps the graph connected
        zero = hidden.float().sum(-1) * 0.0
        return zero, (zero if with_entropy else None)
    ids = mb.flat_target_ids.to(hidden.device, non_blocking=True)
    torch_impl = kernels_impl == "torch"
    if path == "hidden":
        fn = reference.linear_logprobs_reference if torch_impl else kernels.linear_logprobs
        return fn(hidden, weight, ids, temperature, return_entropy=with_entropy, tp_group=tp_group)
    if path != "logits":
        raise ValueError(f"log-prob path {path!r} is not 'logits' or 'hidden'")
    if tp_group is not None:
        from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    logits = torch.nn.functional.linear(hidden, weight)  # [N, V / tp]: the targets' rows only
    if torch_impl:
        return reference.logprobs_reference(logits, ids, temperature, with_entropy, tp_group)
    # Nothing else reads these logits (the matmul's backward needs hidden and weight only): reuse their memory.
    return kernels.logprobs(logits, ids, temperature, with_entropy, tp_group, inplace_backward=True)


def grpo_microbatch_loss(hidden: Tensor, weight: Tensor, mb: MicroBatch, scale: LossScale, algo, temperature: float,
                         kernels_impl: str, path: str = "logits", tp_group=None) -> tuple[Tensor, dict[str, Tensor]]:
    """The scaled GRPO loss of one micro-batch and its (summable) metrics: shares of the loss, token sums."""
    if mb.num_targets == 0:  # an empty (padding-only) micro-batch: it takes part, and adds nothing
        zero = hidden.float().sum() * 0.0
        return zero, {"loss_sum": zero.detach(), "tokens": zero.detach(), "pg_loss_sum": zero.detach()}
    lp, ent = target_logprobs(hidden, weight, mb, temperature, kernels_impl, path, tp_group, with_entropy=True)
    dev = lp.device
    lp, ent = mb.to_layout(lp), mb.to_layout(ent)
    mask = mb.target_mask.to(dev, non_blocking=True)
    fn = grpo_loss_reference if kernels_impl == "torch" else kernels.grpo_loss
    agg, denominator = ("token-mean", None) if scale.per_microbatch else (algo.agg, max(scale.denominator, 1.0))
    # On policy (the step's one update, before it): the policy that sampled is the one being updated, so its
    # log-probs are this forward's; verl's `on_policy` rule in dp_actor.update_policy, one forward saved.
    old = lp.detach() if mb.old_logprobs is None else mb.old_logprobs.to(dev, non_blocking=True)
    value, m = fn(lp, old, mb.advantages.to(dev, non_blocking=True), mask,
                  ref_logprobs=None if mb.ref_logprobs is None else mb.ref_logprobs.to(dev, non_blocking=True),
                  clip_low=algo.clip_low, clip_high=algo.clip_high, clip_dual=algo.clip_dual,
                  kl_coef=algo.kl_coef if mb.ref_logprobs is not None else 0.0, kl_type=algo.kl_type,
                  agg=agg, entropy=ent, denominator=denominator)
    # share of the mini-batch loss: S_m / D for the global modes (the kernel divided by D), or the
    # micro-batch's token mean / (M * dp)
    weight_of_value = 1.0 / scale.returned if scale.per_microbatch else 1.0
    share = value * weight_of_value
    tokens = mask.sum()
    out = {"loss_sum": share.detach(), "tokens": tokens.detach(), "pg_loss_sum": m["pg_loss"] * weight_of_value}
    if "kl_loss" in m:
        out["kl_loss_sum"] = m["kl_loss"] * weight_of_value
    for k in ("clip_frac", "clip_frac_dual", "approx_kl", "entropy"):
        if k in m:
            out[f"{k}_tok"] = m[k] * tokens
    if mb.rollout_logprobs is not None:  # sums of the train-inference mismatch (`algo.mismatch`)
        given = mask * mb.rollout_mask.to(dev, non_blocking=True)
        out["mismatch_exp_sum"], out["mismatch_tokens"] = exp_gap_sums(
            lp, mb.rollout_logprobs.to(dev, non_blocking=True), given)
    return share * scale.returned, out


def sft_microbatch_loss(hidden: Tensor, weight: Tensor, mb: MicroBatch, scale: LossScale, kernels_impl: str,
                        path: str = "logits", tp_group=None) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean next-token cross-entropy over the assistant tokens, scaled as documented above."""
    lp, _ = target_logprobs(hidden, weight, mb, 1.0, kernels_impl, path, tp_group)
    share = -lp.sum() / max(scale.denominator, 1.0)
    tokens = lp.new_tensor(float(mb.num_targets))
    return share * scale.returned, {"loss_sum": share.detach(), "tokens": tokens}
