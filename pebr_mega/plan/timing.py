"""Time of one step, per phase, from the model FLOPs (`models/flops.py`) and the card's rates (`plan/hardware`).

- rollout: prefill of every sequence (no prefix sharing assumed) at the card's measured training model
  TFLOP/s (a proxy: SGLang's prefill has not been measured), then decode, memory-bound: every step reads the
  engine's weights and the batch's KV cache at the measured copy bandwidth (or is compute-bound, whichever is
  slower), in waves of as many sequences as the KV cache holds;
- log-probs (actor and reference, forward only) and update (forward + backward, plus the recomputed
  forwards) at the measured training model TFLOP/s; the output layer runs at the target positions only (the
  response; every token for SFT, an upper bound), in backward once more with the hidden-state log-prob path,
  which recomputes its logits; the vision tower is replicated over TP, so its FLOPs are not divided by TP; a
  pipeline runs at its slowest stage with a (M + PP - 1) / M bubble factor;
- TP all-reduces (2 per layer forward, 2 backward, of tokens x hidden) and the DP gradient all-reduce (fp32,
  once per update) at assumed NCCL bus bandwidths; the Adam step reads and writes ~36 bytes per parameter;
- weight sync: the engine's weights once over NVLink.
Reward scoring (CPU) is not modelled. Every rate's source is printed with the plan.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pebr_mega.models.arch import QwenVLArch
from pebr_mega.models.flops import decoder_forward_flops, vision_forward_flops
from pebr_mega.plan.hardware import GpuSpec
from pebr_mega.plan.memory import stage_layers, total_parameters


@dataclass(frozen=True)
class SequenceFlops:
    """Forward FLOPs of one sequence: decoder layers, output layer (at the targets only), vision tower, prefill
    (no logits but one)."""

    decoder: float
    output: float
    vision: float
    prefill: float


def sequence_flops(arch: QwenVLArch, prompt: int, response: int, grids: list[tuple[int, int, int]],
                   targets: int | None = None) -> SequenceFlops:
    """Forward FLOPs of a sequence of `prompt + response` tokens with images of these patch grids; the actor applies
    the output layer to its `targets` positions only (default: the response)."""
    t = arch.text
    vis = float(vision_forward_flops(arch.vision, torch.tensor(grids, dtype=torch.long))) if grids else 0.0
    head = 2.0 * t.hidden_size * t.vocab_size  # the output layer, per position
    dec = float(decoder_forward_flops(t, prompt + response)) - head * (prompt + response)
    prefill = float(decoder_forward_flops(t, prompt)) - head * (prompt - 1) + vis
    return SequenceFlops(dec, head * (response if targets is None else targets), vis, prefill)


def allreduce_seconds(nbytes: float, ranks: int, busbw: float) -> float:
    """Ring all-reduce: 2 (n - 1) / n of the bytes over the bus bandwidth."""
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * nbytes / busbw


@dataclass(frozen=True)
class Layout:
    """One parallel layout of the actor."""

    tp: int
    pp: int
    dp: int


def model_phase_seconds(arch: QwenVLArch, gpu: GpuSpec, layout: Layout, decoder_flops: float, vision_flops: float,
                        micro_batches: int, tokens_per_mb: int, collectives_per_layer: int,
                        act_bytes: int = 2, output_flops: float = 0.0) -> float:
    """Seconds for one DP replica to run `decoder_flops` + `vision_flops` + `output_flops` (its share: decoder
    layers over the stages, the tower on the first, the output layer on the last) through its TP x PP GPUs."""
    rate = gpu.rate("train").value
    layers = stage_layers(arch.text.num_layers, layout.pp)
    L = arch.text.num_layers
    stage = [decoder_flops * n / L / layout.tp + (vision_flops if i == 0 else 0.0) for i, n in enumerate(layers)]
    stage[-1] += output_flops / layout.tp
    m = max(micro_batches, 1)
    compute = max(stage) / rate * (m + layout.pp - 1) / m
    per_ar = allreduce_seconds(tokens_per_mb * arch.text.hidden_size * act_bytes, layout.tp, gpu.rate("nvlink").value)
    comm = m * max(layers) * collectives_per_layer * per_ar
    return compute + comm


def decode_seconds(arch: QwenVLArch, gpu: GpuSpec, engine_tp: int, sequences_per_engine: int, concurrency: int,
                   prompt: int, response: int, kv_cell_bytes: int, weight_bytes: int) -> float:
    """Memory-bound decode of `sequences_per_engine` in waves of `concurrency` sequences, `response` steps each."""
    if sequences_per_engine == 0 or response == 0:
        return 0.0
    batch = max(1, min(concurrency, sequences_per_engine))
    waves = math.ceil(sequences_per_engine / batch)
    context = prompt + response / 2
    read = (weight_bytes + batch * context * kv_cell_bytes) / gpu.rate("copy").value
    compute = 2.0 * total_parameters(arch) / engine_tp * batch / gpu.rate("train").value
    return waves * response * max(read, compute)


def optimizer_seconds(gpu: GpuSpec, trainable_per_gpu: int, distributed_dp: int) -> float:
    """Adam over the fp32 state: ~36 bytes read or written per parameter (grad, main, m, v, bf16 copy)."""
    return 36.0 * trainable_per_gpu / distributed_dp / gpu.rate("copy").value


def dp_grad_seconds(gpu: GpuSpec, trainable_per_gpu: int, layout: Layout, gpus_per_node: int) -> float:
    """The fp32 gradient all-reduce over DP once per update (over nodes when a DP group leaves its node)."""
    inside = layout.tp * layout.dp <= gpus_per_node
    busbw = gpu.rate("nvlink" if inside else "internode").value
    return allreduce_seconds(4.0 * trainable_per_gpu, layout.dp, busbw)

