"""GRPO math in plain torch: advantages, KL estimators, policy loss, aggregation (the reference)."""
