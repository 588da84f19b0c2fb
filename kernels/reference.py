"""Plain torch references for the fused kernels: the test oracle and the CPU path without the interpreter.

This is also the one torch implementation of the GRPO objective (`grpo_loss_reference` and its parts),
imported under these names wherever the objective is computed in torch.

Written independently of the Triton code, in the most direct form (full `log_softmax`, autograd for the
gradients), so they materialise `[N, V]` intermediates: fine on CPU for tests and the tiny demo, never
used on CUDA. They compute in float64 when given float64 and in float32 otherwise.

Vocab-parallel (`tp_group`): every rank holds an equal, contiguous slice of the vocabulary in rank order
(Megatron's layout). The references gather the full vocabulary, keep the autograd edge to this rank's
slice, and compute the unsharded answer, so each rank gets d(loss)/d(its slice) for a loss that every
rank computes identically (Megatron's convention for vocab-parallel cross-entropy).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

KL_TYPES = ("k1", "k2", "low_var_kl")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
# exp() of a log-ratio beyond +-20 overflows nothing in float32 but gives ratios of e^20 ~ 5e8 that make
# the gradient useless; EasyR1 clamps the log-ratio here (and the clamp also keeps autograd free of
# inf * 0 = NaN in the clipped branches). The k3 estimate is then clamped to +-10 as in EasyR1.
LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0
METRIC_NAMES = ("pg_loss", "kl_loss", "clip_frac", "clip_frac_dual", "approx_kl", "neg_logprob", "entropy")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_vocab(local: Tensor, group) -> Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    parts[rank] = local  # the only slice with an autograd edge: each rank differentiates its own
    return torch.cat(parts, dim=-1)


def logprobs_reference(
    logits: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    tp_group=None,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / T)[token] per row, and the entropy -sum p log p of softmax(logits / T).

    ``logits`` is ``[..., V]`` (``[..., V / world]`` per rank with ``tp_group``); ``token_ids`` is ``[...]``
    with ids into the full vocabulary. -inf logits (padding) get probability 0 and add nothing to the
    entropy.
    """
    full = _gather_vocab(logits, tp_group) if tp_group is not None else logits
    logp_all = torch.log_softmax(full.to(compute_dtype(full.dtype)) / temperature, dim=-1)
    logp = logp_all.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp, None
    p = logp_all.exp()
    # p log p -> 0 as p -> 0; fill before multiplying so that autograd never sees 0 * -inf.
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logp, entropy


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient in backward over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def linear_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    tp_group=None,
) -> tuple[Tensor, Tensor | None]:
    """``logprobs_reference(hidden @ weight.T, ...)``; with ``tp_group`` the weight is this rank's vocab
    slice and the hidden-state gradient is summed over the group (the full gradient on every rank)."""
    if tp_group is not None:
        hidden = _AllReduceGrad.apply(hidden, tp_group)
    dtype = compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T if dtype == torch.float64 else hidden @ weight.T
    return logprobs_reference(logits, token_ids, temperature, return_entropy, tp_group)


def check_loss_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                      ref_logprobs: Tensor | None, entropy: Tensor | None, kl_type: str, agg: str) -> None:
    """Raise ValueError naming the argument when a GRPO loss input has the wrong shape or an unknown mode."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    named = {"old_logprobs": old_logprobs, "advantages": advantages, "mask": mask,
             "ref_logprobs": ref_logprobs, "entropy": entropy}
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type {kl_type!r} is not one of {list(KL_TYPES)}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg {agg!r} is not one of {list(AGG_MODES)}")


# ------------------------------------------------------------------------------------ the GRPO objective
# The one torch implementation of the GRPO loss (kernels sit below algo in the dependency order, so it lives
# here); the fused kernel is tested against `grpo_loss_reference` in
# float64, and this module against loops over rows and a case analysis in tests/algo/test_algo_grpo.py.


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kl_type: str = "low_var_kl") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (Schulman's k1/k2/k3).

    With delta = log pi_ref(y) - log pi(y) for a token y sampled from pi:

    - ``k1``         = -delta = log pi - log pi_ref            (unbiased, high variance, can be negative)
    - ``k2``         = delta^2 / 2                              (biased, low variance)
    - ``low_var_kl`` = exp(delta) - delta - 1  (k3: unbiased, >= 0, low variance), with delta clamped to
      [-20, 20] before exp and the result clamped to [-10, 10] as in EasyR1.
    """
    if kl_type == "k1":
        return logprobs - ref_logprobs
    if kl_type == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kl_type == "low_var_kl":
        delta = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(delta) - delta - 1.0).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
    raise ValueError(f"kl_type {kl_type!r} is not one of {list(KL_TYPES)}")


def policy_loss_per_token(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    clip_dual: float = 3.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip with asymmetric bounds and dual-clip, per token. Returns (loss, clipped, dual_clipped).

    r   = exp(clamp(log pi - log pi_old, -20, 20))
    L1  = -A r,   L2 = -A clamp(r, 1 - clip_low, 1 + clip_high),   Lc = max(L1, L2)      (PPO clip)
    L   = min(Lc, -A c)  if A < 0  else  Lc                                             (dual clip, c = clip_dual)

    The dual clip bounds the loss of a negative-advantage token whose ratio has grown large: without it
    -A r is unbounded in r. ``clipped`` marks L2 > L1 (the clamp decided the loss: the ratio left its
    trust region in the direction the advantage pushes); ``dual_clipped`` marks A < 0 and Lc > -A c.
    """
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = -advantages * clip_dual
    negative = advantages < 0
    loss = torch.where(negative, torch.minimum(loss_ppo, loss_dual), loss_ppo)
    return loss, loss_clipped > loss_unclipped, negative & (loss_ppo > loss_dual)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is nonzero (0 when there are none)."""
    keep = mask != 0
    total = torch.where(keep, values, values.new_zeros(())).sum()
    return total / keep.sum().clamp(min=1).to(values.dtype)


def row_weights(
    mask: Tensor, agg: str = "token-mean", denominator: float | Tensor | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The weight w_b that each masked token of row b gets in the aggregate: loss = sum_b w_b sum_t L_bt.

    - ``token-mean``:          w_b = 1 / D,  D = number of response tokens in the batch
    - ``seq-mean-token-sum``:  w_b = 1 / S,  S = number of rows with at least one response token
    - ``seq-mean-token-mean``: w_b = 1 / (S * n_b),  n_b = response tokens in row b

    ``denominator`` replaces D (token-mean) or S (seq-mean-*) when one optimizer step spans several
    micro-batches or data-parallel ranks and the loss must be normalised by the global count. Counts of
    zero become 1, so a fully masked batch has loss 0 (not NaN). Rows with no response token do not
    count as sequences (verl's current `agg_loss` does the same).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg {agg!r} is not one of {list(AGG_MODES)}")
    per_row = (mask != 0).sum(-1).to(dtype)
    given = None if denominator is None else torch.as_tensor(denominator, dtype=dtype, device=mask.device)
    if agg == "token-mean":
        denom = per_row.sum().clamp(min=1) if given is None else given
        return (1.0 / denom).expand(per_row.shape)
    seqs = (per_row > 0).sum().to(dtype).clamp(min=1) if given is None else given
    if agg == "seq-mean-token-sum":
        return (1.0 / seqs).expand(per_row.shape)
    return 1.0 / (seqs * per_row.clamp(min=1))


def aggregate(
    loss_mat: Tensor, mask: Tensor, agg: str = "token-mean", denominator: float | Tensor | None = None
) -> Tensor:
    """Reduce per-token losses ``[B, T]`` to one number with ``row_weights`` (see there for the modes)."""
    w = row_weights(mask, agg, denominator, loss_mat.dtype)
    return (torch.where(mask != 0, loss_mat, loss_mat.new_zeros(())).sum(-1) * w).sum()


def grpo_loss_reference(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    clip_dual: float = 3.0,
    kl_coef: float = 0.01,
    kl_type: str = "low_var_kl",
    agg: str = "token-mean",
    entropy: Tensor | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective for one batch: aggregate(L_policy + kl_coef * KL) and its metrics.

    All tensors are ``[B, T]``; computed in float64 for float64 ``logprobs``, else in float32.
    ``ref_logprobs=None`` drops the KL term. Since aggregation is linear, aggregating the sum equals
    verl's pg_loss + kl_coef * kl_loss.

    Metrics (0-dim detached tensors; call ``.item()`` when logging):
    ``pg_loss`` and ``kl_loss`` (aggregated like the loss), and masked token means of
    ``clip_frac`` (L2 > L1), ``clip_frac_dual`` (dual clip active), ``approx_kl`` (log pi_old - log pi,
    EasyR1's ppo_kl, on the clamped log-ratio), ``neg_logprob`` (-log pi, EasyR1's entropy estimate) and
    ``entropy`` (the true per-token entropy, when given, e.g. from `pebr_mega.kernels.logprobs`).
    """
    check_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, kl_type, agg)
    dtype = compute_dtype(logprobs.dtype)
    lp, old, adv = logprobs.to(dtype), old_logprobs.to(dtype), advantages.to(dtype)
    pg, clipped, dual = policy_loss_per_token(lp, old, adv, clip_low, clip_high, clip_dual)
    per_token = pg
    metrics: dict[str, Tensor] = {"pg_loss": aggregate(pg, mask, agg, denominator)}
    if ref_logprobs is not None:
        kl = kl_penalty(lp, ref_logprobs.to(dtype), kl_type)
        per_token = pg + kl_coef * kl
        metrics["kl_loss"] = aggregate(kl, mask, agg, denominator)
    loss = aggregate(per_token, mask, agg, denominator)
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics["clip_frac"] = masked_mean(clipped.to(dtype), mask)
    metrics["clip_frac_dual"] = masked_mean(dual.to(dtype), mask)
    metrics["approx_kl"] = masked_mean(-log_ratio, mask)
    metrics["neg_logprob"] = masked_mean(-lp, mask)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.to(dtype), mask)
    return loss, {k: v.detach() for k, v in metrics.items()}
