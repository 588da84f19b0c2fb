"""The actor's settings: optimizer, schedule, micro-batching and what is trained.

Defaults are the PeBR-R1 RL values (PEBR_FACTS, "GRPO settings"): AdamW lr 1e-6, betas (0.9, 0.999),
weight decay 1e-2, constant schedule without warmup, gradient clipping at 1.0, vision tower trained.

Weight decay and which parameters get it. Megatron-Core's optimizer, by default, exempts biases and every
1-D parameter (the RMSNorm weights) from weight decay. Upstream PeBR-R1 (EasyR1 0.3) builds
`torch.optim.AdamW` over *all* trainable parameters, so its weight decay shrinks norms and biases too.
The recipe's numbers (lr 1e-6, wd 1e-2) were tuned with the upstream behaviour, so `decay_all_params=True`
(the default) reproduces it; `False` selects Megatron's exemption (what Megatron pre-training and HF
Trainer do). Either way the decay is decoupled (AdamW: p <- p - lr * wd * p, then the Adam update), and
the gradient is clipped by its global L2 norm over every trainable parameter (tied embeddings counted
once, frozen parameters not at all) with torch's rule: scale by clip / (norm + 1e-6) when that is < 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from pebr_mega.config_fields import ConfigError, choice

LOGPROBS_FROM = ("auto", "logits", "hidden")
# `auto` per device. CUDA: an H100 (docs/PERFORMANCE.md, kernels, 2026-11-26) ran the chunked hidden-state
# kernel at 56.3 ms forward + backward for N = 8,192, h = 3,584, V = 152,064, where a bf16 matmul plus the
# fused log-prob kernel costs 6 N h V FLOPs at the measured 728 TFLOP/s (~41 ms) plus ~5 ms of kernel:
# materialising the target logits is the faster path while its 2.5 GB of bf16 logits fit. CPU: the
# references materialise logits either way, so `logits` (one path fewer to run). Here rather than in
# actor/losses.py so that `pebr plan` reads it without importing the actor.
LOGPROBS_FROM_DEFAULT = {"cuda": "logits", "cpu": "logits"}


def logprobs_path(choice: str, device_type: str) -> str:
    """The log-prob path `actor.logprobs_from` = `choice` runs on a `device_type` ("cuda", "cpu") device."""
    if choice not in LOGPROBS_FROM:
        raise ValueError(f"logprobs_from {choice!r} is not one of {list(LOGPROBS_FROM)}")
    return LOGPROBS_FROM_DEFAULT.get(device_type, "logits") if choice == "auto" else choice


@dataclass
class ActorConfig:
    """Optimizer, learning-rate schedule, micro-batching and freezing for the Megatron actor."""

    lr: float = 1e-6
    min_lr: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    # True: decay every trainable parameter, as upstream PeBR-R1/EasyR1; False: Megatron's default, no decay
    # on biases and 1-D parameters (norms). See the module docstring.
    decay_all_params: bool = True
    lr_schedule: str = choice("constant", ["constant", "cosine", "linear"])
    warmup_ratio: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping (the norm is still computed and reported)
    # Megatron's distributed optimizer shards optimizer state over data-parallel ranks. auto = on with CUDA and
    # a fused Adam (Transformer Engine or Apex), else the plain Megatron optimizer: the distributed one refuses
    # CPU tensors, and with torch's AdamW megatron-core 0.16 cannot reload its checkpoint (measured on an H100,
    # docs/PERFORMANCE.md). "on" where it cannot run is an error.
    distributed_optimizer: str = choice("auto", ["auto", "on", "off"])
    # Sequence packing: samples are packed into micro-batches of at most this many tokens (before the padding
    # to a multiple of 16 x TP), balanced over data-parallel ranks, the same number on every rank (actor.packing).
    micro_batch_tokens: int = 8192
    freeze_vision: bool = False  # the ViT blocks and patch embedding (not the merger)
    freeze_projector: bool = False  # the merger (the MLP from vision features to the LLM's hidden size)
    # Log-prob / loss implementation: triton kernels (CUDA, or CPU under TRITON_INTERPRET=1) or torch.
    kernels: str = choice("auto", ["auto", "triton", "torch"])
    # How target log-probs come from the final hidden states (actor.losses): "logits" materialises the targets'
    # logits [N, V/tp] then runs the fused log-prob kernel; "hidden" runs the chunked hidden-state kernel
    # (never the whole logits; recomputes them in backward). auto = the per-device default from the benchmarks.
    logprobs_from: str = choice("auto", list(LOGPROBS_FROM))

    def __post_init__(self) -> None:
        checks = {
            "lr": self.lr >= 0, "min_lr": self.min_lr >= 0, "adam_beta1": 0 <= self.adam_beta1 < 1,
            "adam_beta2": 0 <= self.adam_beta2 < 1, "adam_eps": self.adam_eps > 0, "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0 <= self.warmup_ratio <= 1, "clip_grad": self.clip_grad >= 0,
            "micro_batch_tokens": self.micro_batch_tokens >= 1,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"config key 'actor.{key}' = {getattr(self, key)!r} is out of range")
