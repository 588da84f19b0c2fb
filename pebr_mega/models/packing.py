"""How a packed row of samples is described to the model, and what its token count must divide by.

A packed micro-batch is one row of T tokens: the samples back to back, then one trailing segment of padding
(`pebr_mega.actor.packing` packs it). The model needs the segment boundaries for attention only, in the
form its layer spec takes:

- `torch` spec: `PackedSegments`, a `PackedSeqParams` with `qkv_format="sbhd"` and the `Segments` layout
  of `pebr_mega.models.attention`. Megatron then treats the row as one sequence of batch 1, applying
  M-RoPE per token with its plain kernel (positions restart per sample in the M-RoPE ids themselves), and
  `SDPACoreAttention` attends every segment causally in one call. Megatron's THD path would apply RoPE
  sample by sample with host reads of every boundary in every layer (see `SDPACoreAttention`).
- `te` spec: Megatron's own THD `PackedSeqParams` (`cu_seqlens`, `max_seqlen`) for TE's fused attention.

The row length T is padded to `token_multiple(tp, sequence_parallel)` (in `models.config`, free of Megatron
for the planner): FP8 GEMMs need the token dimension
divisible by 16 (Transformer Engine, `transformer_engine/pytorch/utils.py: assert_dim_for_fp8_exec`, and
Megatron's own VLM code pads to it), and sequence parallelism splits the row into TP equal parts
(`megatron/core/tensor_parallel/mappings.py`: `_split_along_first_dim` asserts divisibility), each of which
then needs the multiple of 16. Padding is applied on CPU too: the CPU twin enforces the GPU contract.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from pebr_mega.models.attention import Segments


@dataclass
class PackedSegments(PackedSeqParams):
    """The `torch` spec's packed-row description: Megatron sees "sbhd" (batch 1), the core attention the segments."""

    qkv_format: str = "sbhd"
    segments: Segments | None = None


def packed_seq_params(lengths: Sequence[int], spec: str, device: torch.device | str) -> PackedSeqParams:
    """The boundaries of segments of `lengths` tokens for layer spec `spec` (`torch` or `te`), on `device`."""
    if spec == "te":
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32).to(device, non_blocking=True)
        longest = max(lengths)
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                               max_seqlen_kv=longest)
    if spec != "torch":
        raise ValueError(f"packed rows need the torch or te spec (Megatron's local attention has no packed path), got {spec!r}")
    return PackedSegments(segments=Segments.from_lengths(lengths, device))
