"""GRPO math in plain torch: the algorithm's settings and group advantages. The objective itself is
`pebr_mega.kernels.reference` (its one torch implementation)."""
from pebr_mega.algo.grpo import AGG_CHOICES, AlgoConfig, group_advantages, token_advantages

__all__ = ["AGG_CHOICES", "AlgoConfig", "group_advantages", "token_advantages"]
