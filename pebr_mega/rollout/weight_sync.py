"""Weight sync: Megatron TP/PP shards -> full HF-named tensors, in buckets, for the rollout engine.

Every rank of the training job runs the same loop (a sequence of collectives): the full HF tensors come from
`pebr_mega.checkpoint.gather.iter_hf_tensors` (TP all-gather, PP broadcast, un-fusing through the one HF
mapping), the same path the HF export reads, and are grouped here into buckets of at most `bucket_bytes`
(a single larger tensor gets a bucket of its own).

Peak extra memory per rank is about one bucket plus the full tensor being gathered. Every rank ends with
every HF tensor, so any rank can own an engine (SGLang: the first rank of each rollout-TP group).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from pebr_mega.checkpoint.gather import iter_hf_tensors
from pebr_mega.checkpoint.hf_mapping import HFMapping

WeightBucket = list[tuple[str, Tensor]]


@dataclass
class SyncStats:
    """What one sync moved: bytes, tensors, buckets, the largest bucket, and seconds."""

    bytes: int = 0
    tensors: int = 0
    buckets: int = 0
    max_bucket_bytes: int = 0
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """As step metrics."""
        return {"sync/bytes": float(self.bytes), "sync/tensors": float(self.tensors),
                "sync/buckets": float(self.buckets), "time/sync": self.seconds}


def bucketize(tensors: Iterator[tuple[str, Tensor]], bucket_bytes: int, stats: SyncStats | None = None,
              device: str | torch.device | None = None) -> Iterator[WeightBucket]:
    """Group (name, tensor) pairs into buckets of at most `bucket_bytes` (one oversized tensor alone)."""
    bucket: WeightBucket = []
    size = 0

    def flush() -> WeightBucket:
        if stats is not None:
            stats.buckets += 1
            stats.max_bucket_bytes = max(stats.max_bucket_bytes, size)
        return bucket

    for name, t in tensors:
        if device is not None:
            t = t.to(device)
        n = t.numel() * t.element_size()
        if bucket and size + n > bucket_bytes:
            yield flush()
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
        if stats is not None:
            stats.bytes += n
            stats.tensors += 1
    if bucket:
        yield flush()


def sync_weights(model, mapping: HFMapping, engine, bucket_mb: int = 512) -> SyncStats:
    """Push this model's weights into `engine` (a RolloutEngine) and return what was moved, with timing.

    Collective: every rank of the training job calls it; ranks that own no engine pass `engine=None` and
    only take part in the gathers (their stats count the same bytes).
    """
    stats = SyncStats()
    t0 = time.perf_counter()
    buckets = bucketize(iter_hf_tensors(model, mapping), bucket_mb << 20, stats)
    if engine is None:
        for _ in buckets:
            pass
    else:
        engine.update_weights(buckets)
    stats.seconds = time.perf_counter() - t0
    return stats
