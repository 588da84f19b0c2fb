"""GRPO math in plain torch: group advantages, KL estimators, the PPO-clip policy loss, aggregation, metrics.

This module is the readable reference of the objective. The fused Triton kernel
(`pebr_mega.kernels.grpo_loss`) must reproduce `grpo_loss` here to float32 rounding, and the tests check it.
Every function works in any floating dtype (float64 in tests) and on any device.

Conventions (following EasyR1 0.3 / verl, which PeBR-R1 is built on):

- Tensors are `[B, T]`: B responses, T response tokens; `mask` is nonzero on response tokens. Masked
  positions may hold any finite value: they are selected away (`where`), never multiplied by zero.
- The advantage of a response is one number, broadcast to all of its tokens (`token_advantages`).
- The KL penalty against the frozen reference is added to the loss (not subtracted from the reward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from pebr_mega.config_fields import check_fields, choice

# The modes and clamps (and why the clamps) live with the kernels, which sit below this module.
from pebr_mega.kernels.reference import (AGG_MODES, KL_TYPES, LOG_RATIO_CLAMP,  # noqa: F401 (re-exported)
                                        LOW_VAR_KL_CLAMP, check_loss_inputs)


@dataclass
class AlgoConfig:
    """GRPO settings; the defaults are PeBR-R1's (both stages)."""

    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.3  # ratio upper bound 1 + clip_high (asymmetric, as in DAPO)
    clip_dual: float = 3.0  # dual-clip constant c for negative advantages; inf disables
    kl_coef: float = 1e-2  # weight of the KL penalty added to the loss; 0 disables it
    kl_type: str = choice("low_var_kl", KL_TYPES, "KL estimator: k1, k2 or low_var_kl (k3, clamped)")
    agg: str = choice("token-mean", AGG_MODES, "how per-token losses become one number")
    adv_eps: float = 1e-6  # added to the group std before dividing
    norm_adv_by_std: bool = True  # False: Dr.GRPO advantages (score - group mean)

    def __post_init__(self) -> None:
        # The group size is `rollout.n` (the rollout engine's setting); there is no second copy here.
        check_fields("algo", {
            "clip_low": (0.0 <= self.clip_low < 1.0, self.clip_low, "must be in [0, 1)"),
            "clip_high": (self.clip_high >= 0.0, self.clip_high, "must be >= 0"),
            "clip_dual": (self.clip_dual > 1.0, self.clip_dual, "must be > 1 (inf disables)"),
            "kl_coef": (self.kl_coef >= 0.0, self.kl_coef, "must be >= 0 (0 disables)"),
            "adv_eps": (self.adv_eps > 0.0, self.adv_eps, "must be > 0"),
        })


# --------------------------------------------------------------------------------------------- advantages


def group_advantages(
    scores: Tensor,
    group_ids: Tensor | Sequence[int] | None = None,
    n: int | None = None,
    norm_by_std: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """One advantage per response from the scores of its group (the responses to one prompt).

    GRPO:     A_i = (r_i - mean_g) / (std_g + eps)
    Dr.GRPO:  A_i =  r_i - mean_g                       (``norm_by_std=False``)

    ``std_g`` is the unbiased sample standard deviation (``torch.std``, divisor n_g - 1), as in verl's and
    EasyR1's GRPO. A group of one response has no spread to normalise by: like verl we then take
    mean 0 and std 1, so its advantage is its score divided by (1 + eps) (no NaN).

    Groups are given either by ``group_ids`` (any integers, one per response, groups need not be
    contiguous) or by ``n`` (consecutive runs of n responses). Returns a tensor shaped like ``scores``
    (float32 at least).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (one per response), got shape {tuple(scores.shape)}")
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    m = scores.numel()
    if (group_ids is None) == (n is None):
        raise ValueError("give exactly one of group_ids or n")
    if n is not None:
        if n < 1 or m % n:
            raise ValueError(f"{m} scores cannot be split into groups of n={n}")
        inverse = torch.arange(m, device=scores.device) // n
    else:
        ids = torch.as_tensor(group_ids, device=scores.device)
        if ids.shape != scores.shape:
            raise ValueError(f"group_ids shape {tuple(ids.shape)} != scores shape {tuple(scores.shape)}")
        _, inverse = torch.unique(ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if m else 0
    zeros = torch.zeros(groups, dtype=scores.dtype, device=scores.device)
    count = zeros.index_add(0, inverse, torch.ones_like(scores))
    total = zeros.index_add(0, inverse, scores)
    mean = total / count
    sq_dev = zeros.index_add(0, inverse, (scores - mean[inverse]) ** 2)
    std = torch.sqrt(sq_dev / (count - 1).clamp(min=1))
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    centred = scores - mean[inverse]
    return centred / (std[inverse] + eps) if norm_by_std else centred


def token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast one advantage per response ``[B]`` to its tokens ``[B, T]`` (0 where ``mask`` is 0)."""
    return torch.where(mask != 0, advantages[:, None], advantages.new_zeros(()))


# ----------------------------------------------------------------------------------------- per-token terms


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


# ------------------------------------------------------------------------------------------- aggregation


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


# -------------------------------------------------------------------------------------------- the loss


def grpo_loss(
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

    All tensors are ``[B, T]``. ``ref_logprobs=None`` (or ``kl_coef=0``) drops the KL term. Since
    aggregation is linear, aggregating the sum equals verl's pg_loss + kl_coef * kl_loss.

    Metrics (0-dim detached tensors; call ``.item()`` when logging):
    ``pg_loss`` and ``kl_loss`` (aggregated like the loss), and masked token means of
    ``clip_frac`` (L2 > L1), ``clip_frac_dual`` (dual clip active), ``approx_kl`` (log pi_old - log pi,
    EasyR1's ppo_kl, on the clamped log-ratio), ``neg_logprob`` (-log pi, EasyR1's entropy estimate) and
    ``entropy`` (the true per-token entropy, when given, e.g. from `pebr_mega.kernels.logprobs`).
    """
    check_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, kl_type, agg)
    pg, clipped, dual = policy_loss_per_token(logprobs, old_logprobs, advantages, clip_low, clip_high, clip_dual)
    per_token = pg
    metrics: dict[str, Tensor] = {"pg_loss": aggregate(pg, mask, agg, denominator).detach()}
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_type)
        per_token = pg + kl_coef * kl
        metrics["kl_loss"] = aggregate(kl, mask, agg, denominator).detach()
    loss = aggregate(per_token, mask, agg, denominator)
    log_ratio = (logprobs - old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    metrics["clip_frac"] = masked_mean(clipped.to(pg.dtype), mask).detach()
    metrics["clip_frac_dual"] = masked_mean(dual.to(pg.dtype), mask).detach()
    metrics["approx_kl"] = masked_mean(-log_ratio, mask).detach()
    metrics["neg_logprob"] = masked_mean(-logprobs, mask).detach()
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy, mask).detach()
    return loss, metrics
