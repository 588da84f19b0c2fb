"""Train-inference mismatch: how far the engine's sampling probabilities are from the actor's.

NeMo-RL's `token_mult_prob_error`: over the response tokens of a batch,

    mean_t exp(|log p_actor(y_t) - log p_engine(y_t)|)

It is 1.0 when the two agree exactly and grows with any disagreement in either direction (kernels,
precision, stale weights after a failed sync). A value well above 1 means the importance ratios of the
PPO loss are computed against a policy that did not generate the data.

One formula, two callers: `token_mult_prob_error` (the trainer, from the actor's log-probs of a separate pass)
and `exp_gap_sums` (the actor's loss, summed in the update's own forward when the update is on-policy); they
live here because the actor and the rollout engine may not import each other.
"""
from __future__ import annotations

from typing import Sequence

import torch


def exp_gap_sums(actor_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of exp(|Δ log p|) over the tokens where `mask` is set, their number), in float64; the actor's
    log-probs are detached (a metric, not a loss term)."""
    gap = (actor_logprobs.detach().double() - engine_logprobs.double()).abs()
    return (torch.exp(gap) * mask).sum(), mask.sum()


def token_mult_prob_error(actor_logprobs: Sequence[torch.Tensor], engine_logprobs: Sequence[Sequence[float]]) -> float:
    """Mean over all response tokens of exp(|Δ log p|); samples without engine log-probs are ignored."""
    total, count = 0.0, 0
    for a, e in zip(actor_logprobs, engine_logprobs):
        if e is None or len(e) == 0:
            continue
        a = a.detach().cpu().flatten()
        e = torch.as_tensor(e, dtype=torch.float64)
        if a.numel() != e.numel():
            raise ValueError(f"actor has {a.numel()} response log-probs but the engine gave {e.numel()}")
        exp_sum, tokens = exp_gap_sums(a, e, torch.ones_like(e))
        total += exp_sum.item()
        count += int(tokens.item())
    return total / count if count else float("nan")
