"""GRPO math in plain torch: advantages, and the objective re-exported from `pebr_mega.kernels.reference`."""
from pebr_mega.algo.grpo import (
    AGG_CHOICES,
    AGG_MODES,
    KL_TYPES,
    AlgoConfig,
    aggregate,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    policy_loss_per_token,
    row_weights,
    token_advantages,
)

__all__ = ["AGG_CHOICES", "AGG_MODES", "KL_TYPES", "AlgoConfig", "aggregate", "group_advantages", "grpo_loss", "kl_penalty",
           "masked_mean", "policy_loss_per_token", "row_weights", "token_advantages"]
