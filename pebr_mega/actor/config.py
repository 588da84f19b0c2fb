"""The actor's settings: optimizer, schedule, micro-batching and what is trained.

Defaults are the PeBR-R1 RL values (PEBR_FACTS, "GRPO settings"): AdamW lr 1e-6, betas (0.9, 0.999),
weight decay 1e-2, constant schedule without warmup, gradient clipping at 1.0, vision tower trained.
"""
from __future__ import annotations

from dataclasses import dataclass

from pebr_mega.config import choice


@dataclass
class ActorConfig:
    """Optimizer, learning-rate schedule, micro-batching and freezing for the Megatron actor."""

    lr: float = 1e-6
    min_lr: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    lr_schedule: str = choice("constant", ["constant", "cosine", "linear"])
    warmup_ratio: float = 0.0
    clip_grad: float = 1.0
    # Megatron's distributed optimizer shards optimizer state over data-parallel ranks. auto = on with CUDA;
    # on CPU Megatron's DistributedOptimizer refuses non-CUDA tensors, so the plain Megatron optimizer runs.
    distributed_optimizer: str = choice("auto", ["auto", "on", "off"])
    # Sequence packing: samples are packed into micro-batches of at most this many tokens.
    micro_batch_tokens: int = 8192
    freeze_vision: bool = False
    freeze_projector: bool = False
    # Log-prob / loss implementation: triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or torch.
    kernels: str = choice("auto", ["auto", "triton", "torch"])
    logprob_dtype: str = choice("float32", ["float32"])
