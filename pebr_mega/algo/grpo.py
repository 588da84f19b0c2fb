"""GRPO math in plain torch: settings (`AlgoConfig`) and group advantages.

The objective (KL estimators, the PPO-clip policy loss, aggregation, metrics) has one torch implementation,
`pebr_mega.kernels.reference` (`grpo_loss_reference` and its parts; kernels sit below algo in the dependency
order, and the fused Triton kernel `pebr_mega.kernels.ops.grpo_loss` is tested against it in float64): import
it from there. Every function works in any floating dtype (float64 in tests) and on any device.

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

# The objective's modes live with its one implementation, below this module.
from pebr_mega.kernels.reference import AGG_MODES, KL_TYPES

# How a mini-batch's token losses become the one number that is minimised: the three modes of
# `row_weights`, normalised over the whole mini-batch (every micro-batch and data-parallel rank), plus
# `token-mean-microbatch` (upstream PeBR-R1's EasyR1 0.3.2.dev0 fork, `loss_avg_mode: token`): the token mean
# of each micro-batch, divided by the number of micro-batches, averaged over data-parallel ranks; it depends
# on how sequences are grouped into micro-batches (docs/MODEL.md, "Loss aggregation").
AGG_CHOICES = AGG_MODES + ("token-mean-microbatch",)


@dataclass
class AlgoConfig:
    """GRPO settings; the defaults are PeBR-R1's (both stages)."""

    clip_low: float = 0.2  # ratio lower bound 1 - clip_low
    clip_high: float = 0.3  # ratio upper bound 1 + clip_high (asymmetric, as in DAPO)
    clip_dual: float = 3.0  # dual-clip constant c for negative advantages; inf disables
    kl_coef: float = 1e-2  # weight of the KL penalty added to the loss; 0 disables it
    kl_type: str = choice("low_var_kl", KL_TYPES, "KL estimator: k1, k2 or low_var_kl (k3, clamped)")
    agg: str = choice("token-mean", AGG_CHOICES, "how per-token losses become one number (see AGG_CHOICES)")
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
