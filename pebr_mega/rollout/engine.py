"""The rollout-engine contract, and the choice of backend.

Every engine (SGLang on GPU, transformers `generate` on CPU or GPU) implements `RolloutEngine`. Trainers see
only this protocol; the weight-sync path (`weight_sync.py`) produces the buckets `update_weights` takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch

from pebr_mega.config_fields import check_fields, choice, positive, warn_field
from pebr_mega.rollout.types import RolloutRequest, Sample, SamplingParams

WeightBucket = list[tuple[str, torch.Tensor]]

# SGLang's memory tags (sglang/srt/constants.py); `resume_memory(None)` means every released tag.
WEIGHTS = "weights"
KV_CACHE = "kv_cache"


@runtime_checkable
class RolloutEngine(Protocol):
    """Generates n samples per request and takes fresh weights by HF checkpoint name.

    Memory contract (SGLang's, and every engine enforces it, so a CPU test fails where a GPU run would
    silently sample from garbage):

    - `release_memory()` gives back the memory of every tag. The weights are then GONE: SGLang frees them
      without a backup (its scheduler stashes only buffers; sgl-project/sglang#6367), the HF engine frees its
      parameters' storage.
    - `resume_memory(["weights"])` takes the weight memory back with undefined contents; `update_weights`
      fills it (and is refused while the weights' memory is released); `resume_memory()` takes back the rest
      (the KV cache).
    - `generate` is refused while any memory is released, or before every weight has been delivered again
      since the last release.

    Exactly one owner drives this sequence: `pebr_mega.trainer.lifecycle.EngineLifecycle.rollout_phase`
    (free the allocator cache -> resume weights -> sync from the actor -> free the allocator cache -> resume
    the KV cache -> generate -> release), and shuts the engine down at the end of its stage
    (`EngineLifecycle.close`). No other code calls `release_memory` / `resume_memory` / `shutdown`.
    """

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> list[Sample]:
        """Return `sampling.n` samples per request, grouped by request, in request order."""
        ...

    def update_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Load weights given as buckets of (HF checkpoint name, full tensor)."""
        ...

    def release_memory(self) -> None:
        """Free the engine's memory (weights and KV cache) while training runs; the weights are lost."""
        ...

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take back the released memory of `tags` ("weights", "kv_cache"; None = every released tag)."""
        ...

    def shutdown(self) -> None:
        """Stop the engine for good (SGLang: its scheduler processes); every later call is an error."""
        ...


@dataclass
class RolloutConfig:
    """Which engine generates, and how (the rollout-time settings of PEBR_FACTS are the defaults)."""

    engine: str = choice("auto", ["auto", "hf", "sglang"], "auto = sglang when installed with CUDA, else hf")
    n: int = 8
    temperature: float = 1.2
    top_p: float = 0.99
    top_k: int = -1
    max_new_tokens: int = 2048
    val_temperature: float = 0.5
    val_n: int = 1
    batch_size: int = 64  # prompts per generate call of the HF engine
    weight_bucket_mb: int = 512
    # SGLang's own server arguments, passed through unchanged (e.g. {"mem_fraction_static": 0.6}).
    sglang_args: dict = field(default_factory=dict)
    sglang_tp_size: int = 1

    def __post_init__(self) -> None:
        check_fields("rollout", {
            "n": positive(self.n),
            # > 0: the actor divides the logits by the rollout temperature to recompute the sampling log-probs.
            "temperature": (self.temperature > 0, self.temperature, "must be > 0 (training rollouts sample)"),
            "top_p": (0 < self.top_p <= 1, self.top_p, "must be in (0, 1]"),
            "top_k": (self.top_k == -1 or self.top_k >= 1, self.top_k, "must be -1 (off) or >= 1"),
            "max_new_tokens": positive(self.max_new_tokens),
            "val_temperature": (self.val_temperature >= 0, self.val_temperature, "must be >= 0 (0 = greedy)"),
            "val_n": positive(self.val_n),
            "batch_size": positive(self.batch_size),
            "weight_bucket_mb": positive(self.weight_bucket_mb),
            "sglang_tp_size": positive(self.sglang_tp_size),
        })
        if self.n == 1:
            warn_field("rollout", "n", 1, "one sample per prompt has no group to compare with: every GRPO "
                       "advantage is the score itself, without a baseline (the recipe uses 8)")


def group_samples(samples: Sequence[Sample]) -> Iterator[list[Sample]]:
    """Yield consecutive runs of samples that answer the same record (the GRPO groups)."""
    group: list[Sample] = []
    for s in samples:
        if group and s.record_id != group[0].record_id:
            yield group
            group = []
        group.append(s)
    if group:
        yield group
