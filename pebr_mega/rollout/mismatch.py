"""Train-inference mismatch: how far the engine's sampling probabilities are from the actor's.

NeMo-RL's `token_mult_prob_error`: over the response tokens of a batch,

    mean_t exp(|log p_actor(y_t) - log p_engine(y_t)|)

It is 1.0 when the two agree exactly and grows with any disagreement in either direction (kernels,
precision, stale weights after a failed sync). A value well above 1 means the importance ratios of the
PPO loss are computed against a policy that did not generate the data.
"""
from __future__ import annotations

from typing import Sequence

import torch


def token_mult_prob_error(actor_logprobs: Sequence[torch.Tensor], engine_logprobs: Sequence[Sequence[float]]) -> float:
    """Mean over all response tokens of exp(|Δ log p|); samples without engine log-probs are ignored."""
    total, count = 0.0, 0
    for a, e in zip(actor_logprobs, engine_logprobs):
        if e is None or len(e) == 0:
            continue
        a = a.detach().double().cpu().flatten()
        e = torch.as_tensor(e, dtype=torch.float64)
        if a.numel() != e.numel():
            raise ValueError(f"actor has {a.numel()} response log-probs but the engine gave {e.numel()}")
        total += torch.exp((a - e).abs()).sum().item()
        count += e.numel()
    return total / count if count else float("nan")
