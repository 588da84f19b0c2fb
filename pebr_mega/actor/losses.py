"""Per-micro-batch losses of the actor: GRPO (PPO-clip + KL) and SFT (next-token cross-entropy).

Both read the logits of one packed row and the micro-batch's `[n, T]` target layout (`actor.packing`).

Normalisation across micro-batches and data-parallel ranks. The aggregation of a whole mini-batch is
    L = (1 / D) * sum_{micro-batches m} S_m,
where S_m is the micro-batch's *unnormalised* aggregate (the GRPO loss with `denominator=1`: the sum of
token losses for token-mean, the sum of per-sequence means for seq-mean-token-mean, ...) and D the
mini-batch's denominator (its target tokens, or its sequences), known before the step. Megatron's
schedule divides each returned loss by the number of micro-batches M and DDP averages gradients over the
DP ranks (1 / dp), so each micro-batch returns S_m * M * dp / D to make the gradient exactly dL/dθ.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pebr_mega.actor.packing import MicroBatch


@dataclass
class LossScale:
    """The numbers that turn a micro-batch aggregate into its share of the mini-batch loss."""

    denominator: float  # D: target tokens (token-mean) or sequences (seq-mean-*) of the whole mini-batch
    num_microbatches: int  # M on this rank
    dp_size: int

    @property
    def factor(self) -> float:
        """M * dp / D."""
        return self.num_microbatches * self.dp_size / max(self.denominator, 1e-12)


def next_token_targets(input_ids: Tensor) -> Tensor:
    """Targets of every packed position: the next token (the last position's target is a dummy 0)."""
    row = input_ids[0]
    return torch.cat([row[1:], row.new_zeros(1)])


def target_logprobs(logits: Tensor, mb: MicroBatch, temperature: float, kernels_impl: str,
                    tp_group=None, with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of the targets in the `[n, T]` layout, from logits `[1, S, V/tp]`.

    The log-prob is computed once per packed position (one pass over the logits, no float32 copy of them)
    and then gathered into the target layout; masked slots hold 0.
    """
    from pebr_mega import kernels
    from pebr_mega.kernels.reference import logprobs_reference

    fn = logprobs_reference if kernels_impl == "torch" else kernels.logprobs
    row_logits = logits[0]
    targets = next_token_targets(mb.input_ids).to(row_logits.device)
    lp, ent = fn(row_logits, targets, temperature, return_entropy=with_entropy, tp_group=tp_group)
    pos = mb.target_pos.to(lp.device)
    keep = mb.target_mask.to(lp.device) != 0
    # `where`, not `* mask`: a non-finite value at the gathered slot 0 must not leak into masked slots.
    lp_t = torch.where(keep, lp[pos], lp.new_zeros(()))
    ent_t = torch.where(keep, ent[pos], ent.new_zeros(())) if ent is not None else None
    return lp_t, ent_t


def grpo_microbatch_loss(logits: Tensor, mb: MicroBatch, scale: LossScale, algo, temperature: float,
                         kernels_impl: str, tp_group=None) -> tuple[Tensor, dict[str, Tensor]]:
    """The scaled GRPO loss of one micro-batch and its (unscaled, summable) metrics."""
    from pebr_mega import kernels
    from pebr_mega.kernels.reference import grpo_loss_reference

    lp, ent = target_logprobs(logits, mb, temperature, kernels_impl, tp_group, with_entropy=True)
    dev = lp.device
    mask = mb.target_mask.to(dev)
    fn = grpo_loss_reference if kernels_impl == "torch" else kernels.grpo_loss
    agg_sum, m = fn(lp, mb.old_logprobs.to(dev), mb.advantages.to(dev), mask,
                    ref_logprobs=None if mb.ref_logprobs is None else mb.ref_logprobs.to(dev),
                    clip_low=algo.clip_low, clip_high=algo.clip_high, clip_dual=algo.clip_dual,
                    kl_coef=algo.kl_coef if mb.ref_logprobs is not None else 0.0, kl_type=algo.kl_type,
                    agg=algo.agg, entropy=ent, denominator=1.0)
    tokens = mask.sum()
    # Metrics come back as sums over the mini-batch once added up: aggregates as they are, token means
    # weighted by this micro-batch's token count.
    out = {"loss_sum": agg_sum.detach(), "tokens": tokens.detach(), "pg_loss_sum": m["pg_loss"]}
    if "kl_loss" in m:
        out["kl_loss_sum"] = m["kl_loss"]
    for k in ("clip_frac", "clip_frac_dual", "approx_kl", "entropy"):
        if k in m:
            out[f"{k}_tok"] = m[k] * tokens
    return agg_sum * scale.factor, out


def sft_microbatch_loss(logits: Tensor, mb: MicroBatch, scale: LossScale, kernels_impl: str,
                        tp_group=None) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-mean next-token cross-entropy over the assistant tokens, scaled as documented above."""
    lp, _ = target_logprobs(logits, mb, 1.0, kernels_impl, tp_group)
    mask = mb.target_mask.to(lp.device)
    nll_sum = -(lp * mask).sum()
    tokens = mask.sum()
    return nll_sum * scale.factor, {"loss_sum": nll_sum.detach(), "tokens": tokens.detach()}
