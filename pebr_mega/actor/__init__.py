"""The training actor: Megatron forward/backward, log-probs, optimizer."""
