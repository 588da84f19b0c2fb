"""Full tensors from TP/PP shards: what the HF export and the rollout weight sync both read.

Every rank of the training job runs the same loop (it is a sequence of collectives):

1. the pipeline stages exchange the list of their parameters (global names, full shapes, dtypes);
2. for each stage in order, for each of its parameters: the stage's TP ranks all-gather their shards and
   merge them (`merge_tp_shards` knows that fc1 is cat(gate, up) per rank), then the stage broadcasts the full
   tensor to the other stages of its pipeline;
3. `iter_hf_tensors` un-fuses each full Megatron tensor into HF tensors (qkv per query group into q/k/v, fc1
   into gate/up) through the one mapping in `pebr_mega.checkpoint.hf_mapping`.

Every rank ends with every tensor, so any rank can write the export or own a rollout engine.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from pebr_mega.checkpoint.hf_mapping import HFMapping, canonical_mcore_name, merge_tp_shards, tp_split_dim

Manifest = list[tuple[str, tuple[int, ...], torch.dtype]]


def unwrap(model):
    """The `Qwen25VLModel` stage inside a DDP wrapper or a `MegatronActor` (their `.module`)."""
    while not hasattr(model, "global_name") and hasattr(model, "module"):
        model = model.module
    return model


def parameter_manifest(model, tp_size: int) -> Manifest:
    """(canonical global name, full shape, dtype) of every parameter of this pipeline stage."""
    model = unwrap(model)
    out = []
    for name, p in model.named_parameters():
        gname = canonical_mcore_name(model.global_name(name))
        shape = list(p.shape)
        dim = tp_split_dim(gname)
        if dim is not None and tp_size > 1:
            shape[dim] *= tp_size
        out.append((gname, tuple(shape), p.dtype))
    return out


def count_parameters(model) -> int:
    """Parameters of the whole model (summed over pipeline stages, TP shards counted once); collective over PP."""
    from megatron.core import parallel_state as mpu

    manifest = parameter_manifest(model, mpu.get_tensor_model_parallel_world_size())
    local = sum(int(torch.Size(shape).numel()) for _, shape, _ in manifest)
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        t = torch.tensor([local], dtype=torch.float64)
        dist.all_reduce(t, group=mpu.get_pipeline_model_parallel_group())
        local = int(t.item())
    return local


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
    manifest = parameter_manifest(model, tp_size)
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


def iter_hf_tensors(model, mapping: HFMapping | None = None) -> Iterator[tuple[str, Tensor]]:
    """(HF checkpoint name, tensor) for the whole model, as the HF export writes them; collective."""
    mapping = mapping or HFMapping(unwrap(model).arch)
    for name, full in iter_full_params(model):
        yield from mapping.mcore_to_hf_tensors(name, full)
