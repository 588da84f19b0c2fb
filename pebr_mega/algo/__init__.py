"""GRPO math in plain torch: advantages, KL estimators, policy loss, aggregation (the reference)."""
from pebr_mega.algo.grpo import (
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

__all__ = ["AGG_MODES", "KL_TYPES", "AlgoConfig", "aggregate", "group_advantages", "grpo_loss", "kl_penalty",
           "masked_mean", "policy_loss_per_token", "row_weights", "token_advantages"]
