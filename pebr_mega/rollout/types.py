"""The data that crosses the rollout <-> training boundary.

`Sample` is the only thing passed from the rollout engine to the trainer (slime's design): one generated
response with its prompt, the record it answers, and everything later phases fill in (reward, advantage).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class SamplingParams:
    """How to sample: the recipe's rollout defaults (n = 8, temperature 1.2, top_p 0.99)."""

    n: int = 8
    temperature: float = 1.2
    top_p: float = 0.99
    top_k: int = -1  # -1 = disabled
    max_new_tokens: int = 2048
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    # Tokens that may never be generated: the vision special tokens (an `<|image_pad|>` in a response would
    # be taken for an image by the actor's embedding and M-RoPE positions).
    banned_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        """Raise ValueError naming the field if a value is out of range."""
        if self.n < 1:
            raise ValueError(f"sampling.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class RolloutRequest:
    """One prompt to answer: token ids with image pads already expanded, and preprocessed images."""

    record_id: str
    prompt_ids: list[int]
    pixel_values: torch.Tensor | None = None  # [num_patches, C*T*P*P]
    image_grid_thw: torch.Tensor | None = None  # [num_images, 3]
    images: list[Any] = field(default_factory=list)  # PIL images as the policy sees them (the CLIP reward)
    record: Any = None  # the source record (answer, key_words), carried through for rewards


@dataclass
class Sample:
    """One generated response and what training attaches to it."""

    request: RolloutRequest
    index: int  # 0..n-1 within its group
    response_ids: list[int]
    response_text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens reached)
    rollout_logprobs: list[float] | None = None  # per response token, from the engine, when it gives them
    reward: float = 0.0
    reward_components: dict[str, float] = field(default_factory=dict)
    advantage: float = 0.0

    @property
    def record_id(self) -> str:
        """The id of the record (question) this sample answers; samples of one record form a GRPO group."""
        return self.request.record_id
