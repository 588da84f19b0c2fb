"""Weight sync: Megatron TP/PP shards -> full HF-named tensors, in buckets, for the rollout engine.

Every rank of the training job runs the same loop (it is a sequence of collectives):

1. the pipeline stages exchange the list of their parameters (global names, full shapes, dtypes);
2. for each stage in order, for each of its parameters: the stage's TP ranks all-gather their shards and
   merge them (`merge_tp_shards` knows that fc1 is cat(gate, up) per rank), then the stage broadcasts the full
   tensor to the other stages of its pipeline;
3. the full Megatron tensor is un-fused into HF tensors (qkv per query group into q/k/v, fc1 into gate/up)
   through the one mapping in `pebr_mega.checkpoint.hf_mapping`, and HF tensors are grouped into buckets
   of at most `bucket_bytes` (a single larger tensor gets a bucket of its own).

Peak extra memory per rank is about one bucket plus the full tensor being gathered. Every rank ends with
every HF tensor, so any rank can own an engine (SGLang: the first rank of each rollout-TP group).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from pebr_mega.checkpoint.hf_mapping import HFMapping, canonical_mcore_name, merge_tp_shards, tp_split_dim

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


def _stage_manifest(model, tp_size: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    out = []
    for name, p in model.named_parameters():
        gname = canonical_mcore_name(model.global_name(name))
        shape = list(p.shape)
        dim = tp_split_dim(gname)
        if dim is not None and tp_size > 1:
            shape[dim] *= tp_size
        out.append((gname, tuple(shape), p.dtype))
    return out


def unwrap(model):
    """The `Qwen25VLModel` stage inside a DDP wrapper or a `MegatronActor` (their `.module`)."""
    while not hasattr(model, "global_name") and hasattr(model, "module"):
        model = model.module
    return model


def iter_full_params(model) -> Iterator[tuple[str, Tensor]]:
    """(canonical global Megatron name, full tensor) for every parameter of the whole model, on every rank.

    `model` is this rank's stage (or its DDP wrapper, or the actor). Collective over the TP and PP groups:
    every rank must consume the whole iterator. A tied output layer's copy on the last stage (PP > 1) comes
    out under its own name, `language_model.output_layer.weight`; the HF mapping drops it.
    """
    from megatron.core import parallel_state as mpu

    model = unwrap(model)
    tp_size = mpu.get_tensor_model_parallel_world_size()
    pp_size = mpu.get_pipeline_model_parallel_world_size()
    pp_rank = mpu.get_pipeline_model_parallel_rank()
    params = dict(model.named_parameters())
    local_names = {canonical_mcore_name(model.global_name(n)): n for n in params}
    manifest = _stage_manifest(model, tp_size)
    if pp_size > 1:
        manifests: list = [None] * pp_size
        dist.all_gather_object(manifests, manifest, group=mpu.get_pipeline_model_parallel_group())
    else:
        manifests = [manifest]
    pp_ranks = dist.get_process_group_ranks(mpu.get_pipeline_model_parallel_group()) if pp_size > 1 else [None]
    seen: set[str] = set()
    for stage, entries in enumerate(manifests):
        for name, shape, dtype in entries:
            if stage == pp_rank:
                full = _gather_tp(name, params[local_names[name]].detach(), tp_size)
            else:
                full = torch.empty(shape, dtype=dtype, device=next(iter(params.values())).device)
            if pp_size > 1:
                dist.broadcast(full, src=pp_ranks[stage], group=mpu.get_pipeline_model_parallel_group())
            if name in seen:  # stages never share a name today; this guards a future shared parameter
                continue
            seen.add(name)
            yield name, full


def _gather_tp(name: str, shard: Tensor, tp_size: int) -> Tensor:
    if tp_size == 1 or tp_split_dim(name) is None:
        return shard
    from megatron.core import parallel_state as mpu

    shards = [torch.empty_like(shard) for _ in range(tp_size)]
    dist.all_gather(shards, shard.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return merge_tp_shards(name, shards)


def iter_hf_tensors(model, mapping: HFMapping) -> Iterator[tuple[str, Tensor]]:
    """(HF checkpoint name, tensor) for the whole model, as `tools/export_to_hf.py` writes them."""
    for name, full in iter_full_params(model):
        yield from mapping.mcore_to_hf_tensors(name, full)


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
