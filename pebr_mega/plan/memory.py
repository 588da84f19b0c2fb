"""GPU memory of the colocated schedule, per GPU, from the architecture and the configuration alone.

Parameters and optimizer state follow the accounting of Megatron-LM's theoretical memory report
(`megatron/training/theoretical_memory_usage.py`, `compute_weight_and_optimizer_memory`: 18 bytes per
parameter with bf16 parameters, fp32 gradients, fp32 main parameters and two fp32 Adam moments; the fp32
pieces of the optimizer divided by DP with the distributed optimizer), applied to what this actor builds:
the vision tower replicated on every TP rank of the first pipeline stage (`models/vision.py`), the gradient
buffer in fp32 (`grad_reduce_in_fp32=True` in `actor/megatron_actor.py`), no main copy for fp32 parameters
(Megatron's FP32Optimizer), frozen parameters without gradients or optimizer state.

Activations are counted per saved tensor of this code, not with Megatron's GPT formula (whose MLP, norms and
attention differ from ours): the decoder layer of the `torch` spec (Megatron's local layer with SDPA), the
plain-torch vision tower, per token or per patch. Two kernel profiles differ in what the autograd graph
keeps: on CUDA `torch.rms_norm` runs the fused kernel (saves its input and rstd) and Megatron fuses SwiGLU
(`bias_activation_fusion`: `SwiGLUFunction` saves its input only); on CPU both are decomposed (the norm keeps
an fp32 copy of its input and the fp32 normalised value; the GLU keeps the `x_linear + offset` sum, the silu
output and the product). The CPU profile is checked against measured saved bytes in tests/plan/test_plan.py; the
CUDA profile differs from it only in those two places. The `te` spec is counted as the `torch` spec.

The last stage computes log-probs at the target positions only (actor/losses.py): their hidden states are
gathered after the final norm, and `actor.logprobs_from` either materialises their logits [N, V/tp] (the fused
kernel's backward overwrites them with their gradient) or runs the chunked hidden-state kernel (one chunk of
logits at a time, recomputed in backward). N is what the planner says a micro-batch trains (`planner.Workload`).

The rollout engine (SGLang) sizes its KV cache as SGLang's `ModelRunner.profile_max_num_token` does: of the
memory free when the engine starts (the actor, its gradient buffer and main parameters and the reference are
already resident), `mem_fraction_static` goes to the weights and the KV cache, the rest stays free; the
optimizer's Adam moments appear at the first update, in memory the engine counted as free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pebr_mega.actor.config import LOGPROBS_FROM
from pebr_mega.models.arch import QwenVLArch, TextArch, VisionArch
from pebr_mega.models.vision import frame_lengths, window_order

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Outside PyTorch's caching allocator and so invisible to torch.cuda.max_memory_allocated: the CUDA context,
# cuBLAS workspaces and NCCL buffers of one process. Assumed, not measured by this project.
CUDA_CONTEXT_BYTES = int(1.0 * GIB)
# Fragmentation allowance of the caching allocator on the dynamic (activation) part. Assumed.
ALLOCATOR_HEADROOM = 0.10
# SGLang's CUDA graphs (decode batch sizes up to its cuda_graph_max_bs). SGLang logs the measured figure at
# capture ("Capture cuda graph end ... mem usage"); this is an assumed typical value for 3B-7B models.
CUDA_GRAPH_BYTES = int(1.0 * GIB)
# SGLang's default chunked-prefill chunk, tokens (its ServerArgs picks 8192 or more on 80 GB+ cards).
SGLANG_PREFILL_CHUNK = 8192
# Logits per chunk of the hidden-state log-prob path (`kernels/_linear_triton.py`, CHUNK_ELEMENTS; not imported:
# that module imports Triton, which must not be chosen before the tests pick its interpreter; a test compares).
HIDDEN_PATH_CHUNK_ELEMENTS = 2**28
LOGPROB_PATHS = tuple(p for p in LOGPROBS_FROM if p != "auto")  # the actor's paths (auto picks one)


# ------------------------------------------------------------------------------------------------ parameters
def layer_parameters(t: TextArch, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank (qkv with bias, out proj, SwiGLU; norms replicated)."""
    qkv = (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
    h = t.hidden_size
    return (h * qkv + qkv + t.num_heads * t.head_dim * h + 3 * h * t.intermediate_size) // tp + 2 * h


def vision_parameters(v: VisionArch) -> tuple[int, int]:
    """(tower: patch embedding + blocks, merger) parameters of the vision tower."""
    c, fi, m = v.hidden_size, v.intermediate_size, v.hidden_size * v.spatial_merge_size**2
    patch = c * v.in_channels * v.temporal_patch_size * v.patch_size**2
    block = (c * 3 * c + 3 * c) + (c * c + c) + 2 * (c * fi + fi) + (fi * c + c) + 2 * c
    merger = c + (m * m + m) + (m * v.out_hidden_size + v.out_hidden_size)
    return patch + v.depth * block, merger


def total_parameters(arch: QwenVLArch) -> int:
    """Parameters of the whole model (a tied embedding counted once)."""
    t = arch.text
    tower, merger = vision_parameters(arch.vision)
    embedding = t.vocab_size * t.hidden_size
    return tower + merger + embedding * (1 if t.tie_word_embeddings else 2) + t.num_layers * layer_parameters(t) + t.hidden_size


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Decoder layers per pipeline stage, as `models/qwen25_vl._pipeline_split` builds them (last takes the rest)."""
    base, rem = divmod(num_layers, pp)
    return [base] * (pp - 1) + [base + rem]


@dataclass(frozen=True)
class StageParams:
    """Parameters held by one GPU of pipeline stage `stage` (one TP shard)."""

    stage: int
    vision_tower: int
    merger: int
    embedding: int
    num_layers: int
    layers: int
    final_norm: int
    output: int
    largest_layer_tensor: int  # elements of the largest weight in a decoder layer or the vision tower here

    @property
    def total(self) -> int:
        return self.vision_tower + self.merger + self.embedding + self.layers + self.final_norm + self.output

    def trainable(self, freeze_vision: bool, freeze_projector: bool) -> int:
        """Parameters with gradients and optimizer state."""
        return self.total - (self.vision_tower if freeze_vision else 0) - (self.merger if freeze_projector else 0)


def stage_params(arch: QwenVLArch, tp: int, pp: int, stage: int) -> StageParams:
    """What one GPU of `stage` holds: the tower on the first stage (replicated over TP), the vocabulary-parallel
    embedding (first) and output layer (last; a tied model builds a copy there only when pp > 1)."""
    t = arch.text
    first, last = stage == 0, stage == pp - 1
    tower, merger = vision_parameters(arch.vision) if first else (0, 0)
    shard = t.vocab_size * t.hidden_size // tp
    n = stage_layers(t.num_layers, pp)[stage]
    output = shard if last and (not t.tie_word_embeddings or pp > 1) else 0
    h, v = t.hidden_size, arch.vision
    qkv = (t.num_heads + 2 * t.num_kv_heads) * t.head_dim
    largest = max(h * 2 * t.intermediate_size // tp, h * qkv // tp, t.num_heads * t.head_dim * h // tp)
    if first:
        m = v.hidden_size * v.spatial_merge_size**2
        largest = max(largest, v.hidden_size * v.intermediate_size, 3 * v.hidden_size**2, m * m, m * v.out_hidden_size)
    return StageParams(stage, tower, merger, shard if first else 0, n, n * layer_parameters(t, tp),
                       t.hidden_size if last else 0, output, largest)


# ------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class KernelProfile:
    """Which kernels the layers run on, as far as it changes what backward keeps."""

    name: str
    fused_rms_norm: bool  # CUDA: torch.rms_norm -> aten._fused_rms_norm (saves input + rstd)
    fused_swiglu: bool  # Megatron bias_activation_fusion (on with CUDA, models/qwen25_vl.transformer_config)
    # models/attention.py: flash varlen on CUDA in bf16 (saves q, k, v, output, lse: the inputs stay alive);
    # on CPU the padded SDPA batch (saves its gathered q, k, v per padded slot: the inputs are freed)
    padded_attention: bool = False


CUDA = KernelProfile("cuda", fused_rms_norm=True, fused_swiglu=True, padded_attention=False)
CPU = KernelProfile("cpu", fused_rms_norm=False, fused_swiglu=False, padded_attention=True)


def decoder_layer_bytes(t: TextArch, tp: int, b: int, recompute: str, profile: KernelProfile,
                        sequence_parallel: bool = False, slots_per_token: float = 1.0) -> float:
    """Bytes one decoder layer keeps for backward, per token, on one TP rank (recompute none or selective).

    Kept: each RMSNorm's input (and on CPU its fp32 copies) and rstd; the norm outputs as the qkv and fc1
    inputs; the qkv output (alive through the value view), the rotated q and k, Megatron's unfused M-RoPE
    cos/sin (cast to the activation dtype, for q and for k); the attention's output and log-sum-exp; the
    out-proj input; the SwiGLU input (2f) and output (f), plus two more f-wide tensors unfused. Selective
    recompute (Megatron's default module `core_attn`) drops the attention's output and log-sum-exp.
    With the padded attention path (`profile.padded_attention`, models/attention.py on CPU) the attention keeps
    its own gathered q, k, v, output and log-sum-exp per padded slot (`slots_per_token` = n x max_len / T of
    the packed row) and an int64 index per slot and per token, while the qkv output and the rotated q and k are
    freed (the gather's backward needs only its index).
    """
    h, f, np_, ng, d = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    sp = tp if sequence_parallel else 1
    norm = (b * h + 4) / sp if profile.fused_rms_norm else (8 * h + 4) / sp
    norm_outputs = 2 * b * h / sp
    attention = b * d * (np_ + 2 * ng + np_ + ng) / tp
    rope = 4 * d * b
    core = b * np_ * d / tp + 4 * np_ / tp
    proj_input = b * np_ * d / tp
    mlp = (3 if profile.fused_swiglu else 5) * b * f / tp
    if profile.padded_attention and recompute != "selective":
        attention, core = slots_per_token * (b * d * (2 * np_ + 2 * ng) / tp + 4 * np_ / tp + 8) + 8, 0.0
    total = 2 * norm + norm_outputs + attention + rope + core + proj_input + mlp
    if recompute == "selective":
        total -= core
    return total


def square_image_grid(v: VisionArch, max_pixels: int) -> tuple[int, int, int]:
    """Patch grid (t, h, w) of a square image resized to at most `max_pixels` (the processor's rounding)."""
    unit = v.patch_size * v.spatial_merge_size
    side = max(unit, math.floor(math.sqrt(max_pixels) / unit) * unit)
    n = side // v.patch_size
    return 1, n, n


def _segments(v: VisionArch, grids: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    g = torch.tensor(grids, dtype=torch.long)
    _, windows = window_order(g, v.spatial_merge_size, v.window_size // v.spatial_merge_size // v.patch_size)
    return windows, frame_lengths(g)


def _attention_bytes(v: VisionArch, b: int, lens: list[int], padded: bool) -> float:
    """Bytes the vision attention keeps for `lens` segments, in total (models/attention.varlen_attention)."""
    c, nv = v.hidden_size, v.num_heads
    n = sum(lens)
    if not padded:
        # flash varlen: qkv output (alive through v's view), rotated q and k, output + lse, the out-proj input.
        return n * (3 * b * c + 2 * b * c + b * c + 4 * nv + b * c)
    slots = len(lens) * max(lens)
    # Padded SDPA: gathered q, k, v, SDPA output + lse and the slot index (int64) per padded slot, the key mask
    # (bool) per slot for uneven segments; per token its index (int64) and the output that feeds the out-proj.
    mask = 0 if len(set(lens)) == 1 else 1
    return slots * (4 * b * c + 4 * nv + 8 + mask) + n * (b * c + 8)


def vision_bytes(v: VisionArch, grids: list[tuple[int, int, int]], b: int, recompute: bool,
                 freeze_tower: bool = False, freeze_merger: bool = False, padded: bool = False) -> tuple[float, float]:
    """(bytes the vision tower keeps for backward, bytes one recomputed block adds in backward) for images of
    these patch grids (one micro-batch); with `recompute` (torch.utils.checkpoint per block) a block keeps only
    its input. A frozen tower keeps nothing (no input of it needs a gradient); a trainable merger behind it keeps
    the inputs of its norm weight, its two linears and its GELU."""
    if not grids:
        return 0.0, 0.0
    c, fi = v.hidden_size, v.intermediate_size
    windows, frames = _segments(v, grids)
    n = sum(windows)
    if freeze_tower:
        return (0.0 if freeze_merger else n * 4 * b * c), 0.0
    norm = n * (4 * c + 4 + b * c)  # fp32 copy of the input, rstd, normalised value in the activation dtype
    mlp = n * (b * c + 4 * b * fi)  # MLP input; gate, up, silu(gate) and the product
    per_block = {False: 2 * norm + n * b * c + mlp + _attention_bytes(v, b, windows, padded),
                 True: 2 * norm + n * b * c + mlp + _attention_bytes(v, b, frames, padded)}
    full = set(v.fullatt_block_indexes)
    blocks = [per_block[i in full] for i in range(v.depth)]
    patch_in = n * b * v.in_channels * v.temporal_patch_size * v.patch_size**2
    rotary = n * 2 * 4 * v.head_dim  # cos and sin, fp32, shared by every block
    indices = n * 2 * 8 / v.spatial_merge_size**2  # window order and its inverse, int64 per merged token
    merger = n * (4 * c + 4 + 4 * b * c)
    if recompute:
        return patch_in + rotary + indices + merger + v.depth * n * b * c, max(blocks)
    return patch_in + rotary + indices + merger + sum(blocks), 0.0


@dataclass(frozen=True)
class MicroBatch:
    """What one packed micro-batch holds: its tokens (padding included), the patch grids of its images and its
    trained targets (the positions whose hidden states reach the output layer)."""

    tokens: int
    grids: tuple[tuple[int, int, int], ...] = ()
    slots: int = 0  # n x max_len of the packed row's samples (the padded attention's batch); 0: = tokens
    targets: int | None = None  # None: every token (the upper bound)

    @property
    def target_count(self) -> int:
        return self.tokens if self.targets is None else self.targets


def stage_activation_bytes(arch: QwenVLArch, sp: StageParams, mb: MicroBatch, tp: int, b: int, recompute: str,
                           recompute_num_layers: int, vision_recompute: bool, profile: KernelProfile,
                           last: bool, sequence_parallel: bool = False, freeze_vision: bool = False,
                           freeze_projector: bool = False) -> dict[str, float]:
    """Bytes of one micro-batch on one stage, by part: saved by the decoder layers, the vision tower, the
    embedding and the head; `recompute` / `vision recompute`: what one recomputed chunk adds during backward."""
    t, T = arch.text, mb.tokens
    slots = mb.slots / T if mb.slots and T else 1.0
    out: dict[str, float] = {}
    if recompute == "full":
        chunks = math.ceil(sp.num_layers / max(recompute_num_layers, 1))
        chunk = min(recompute_num_layers, sp.num_layers)
        out["decoder"] = T * (chunks * b * t.hidden_size / (tp if sequence_parallel else 1) + 4 * t.head_dim)
        # Backward recomputes one chunk at a time: its full activations exist while it is differentiated.
        out["recompute"] = T * chunk * decoder_layer_bytes(t, tp, b, "none", profile, sequence_parallel, slots)
    else:
        out["decoder"] = T * sp.num_layers * decoder_layer_bytes(t, tp, b, recompute, profile, sequence_parallel,
                                                                  slots)
    if sp.stage == 0:
        out["vision"], extra = vision_bytes(arch.vision, list(mb.grids), b, vision_recompute, freeze_vision,
                                            freeze_projector, profile.padded_attention)
        if extra:
            out["vision recompute"] = extra
        out["embedding"] = T * (8 + 1)  # token ids (int64) for the embedding backward, the image-pad mask
    if last:
        out["head"] = head_bytes(t, T, mb.target_count, tp, b, profile, sequence_parallel)
    return out


def head_bytes(t: TextArch, tokens: int, targets: int, tp: int, b: int, profile: KernelProfile,
               sequence_parallel: bool = False) -> float:
    """Bytes the last stage keeps for backward after its decoder layers: the final norm's (over every token; split
    over TP with sequence parallelism) and, of the `targets` positions only, their gathered hidden states (the
    output layer's input) and int64 index. The gather's backward keeps only the index (models/qwen25_vl.py,
    `target_hidden`), so the final hidden states of the other tokens are freed after the forward."""
    h = t.hidden_size
    sp = tp if sequence_parallel else 1
    norm = (b * h + 4) if profile.fused_rms_norm else (8 * h + 4)
    return tokens * norm / sp + targets * (b * h + 8)


def logits_bytes(t: TextArch, rows: int, tp: int, b: int) -> int:
    """Vocabulary-parallel logits [rows, V / tp] in the activation dtype."""
    return rows * (t.vocab_size // tp) * b


def hidden_path_chunk_rows(t: TextArch, tp: int) -> int:
    """Rows per chunk of the hidden-state path (`kernels.linear_logprobs`' default: about 2^28 logits)."""
    return max(1, HIDDEN_PATH_CHUNK_ELEMENTS // (t.vocab_size // tp))


def logprob_bytes(t: TextArch, targets: int, tp: int, b: int, path: str) -> tuple[float, float]:
    """(kept from the forward to the backward, transient at the start of backward) by the log-prob path of
    `actor.logprobs_from` (actor/losses.py `target_logprobs`) for `targets` target positions.

    `logits`: the targets' logits [N, V / tp], kept by the fused log-prob kernel, whose backward overwrites them
    with their gradient (`inplace_backward`): nothing transient. `hidden`: `kernels.linear_logprobs` keeps only
    per-target statistics; one chunk of logits exists in forward and again, recomputed, in backward. Both: per
    target, the float32 log-prob, log-sum-exp and entropy and the int64 target id.
    """
    if path not in LOGPROB_PATHS:
        raise ValueError(f"log-prob path {path!r} is not one of {LOGPROB_PATHS}")
    stats = 20.0 * targets
    if path == "logits":
        return stats + logits_bytes(t, targets, tp, b), 0.0
    return stats, float(logits_bytes(t, min(targets, hidden_path_chunk_rows(t, tp)), tp, b))


def backward_workspace_bytes(t: TextArch, sp: StageParams, tokens: int, tp: int, b: int, last: bool,
                             targets: int | None = None) -> float:
    """Gradients that exist at the peak of backward, beyond the saved activations and the log-prob path's own
    (`logprob_bytes`).

    On the last stage: the larger of the output layer's weight gradient and a layer's largest weight gradient
    (each whole for a moment before DDP adds it into the fp32 buffer: this actor has no gradient-accumulation
    fusion), the targets' hidden-state gradient, and the hidden-state gradient of every token (the gather's
    backward scatters the targets' into it). Other stages: the hidden-state gradient received from the next
    stage and the largest weight gradient. Calibrated on CPU (tests/plan/test_plan.py).
    """
    hidden = tokens * t.hidden_size * b
    if not last:
        return hidden + sp.largest_layer_tensor * b
    output = t.vocab_size // tp * t.hidden_size
    n = tokens if targets is None else targets
    return max(output, sp.largest_layer_tensor) * b + hidden + n * t.hidden_size * b


# ------------------------------------------------------------------------------------------------ tables
@dataclass
class Row:
    """One line of a memory table: bytes, and what they are."""

    name: str
    bytes: float
    note: str = ""
    counted: bool = True  # False: shown for comparison, not part of the total


@dataclass
class MemoryTable:
    """Rows whose counted bytes add up to the phase's peak."""

    rows: list[Row] = field(default_factory=list)

    def add(self, name: str, nbytes: float, note: str = "", counted: bool = True) -> None:
        self.rows.append(Row(name, float(nbytes), note, counted))

    @property
    def total(self) -> float:
        return sum(r.bytes for r in self.rows if r.counted)

    def get(self, name: str) -> float:
        return next(r.bytes for r in self.rows if r.name == name)


@dataclass(frozen=True)
class OptimizerBytes:
    """Per-GPU bytes of the actor's persistent training state."""

    params: int
    grads: int
    main_params: int
    adam: int

    @property
    def at_build(self) -> int:
        """Allocated when the actor is built (Adam's moments appear at the first update)."""
        return self.params + self.grads + self.main_params

    @property
    def total(self) -> int:
        return self.at_build + self.adam


def optimizer_bytes(sp: StageParams, trainable: int, param_bytes: int, distributed: bool, dp: int) -> OptimizerBytes:
    """Parameters, fp32 gradient buffer, fp32 main parameters (bf16/fp16 only) and Adam moments of one GPU."""
    shard = dp if distributed else 1
    main = 0 if param_bytes == 4 else 4 * trainable // shard
    return OptimizerBytes(sp.total * param_bytes, 4 * trainable, main, 8 * trainable // shard)


def kv_bytes_per_token(t: TextArch, engine_tp: int, kv_bytes: int = 2) -> int:
    """SGLang's KV cell: K and V of every layer, KV heads split over the engine's TP (at least one per rank)."""
    return 2 * t.num_layers * max(1, t.num_kv_heads // engine_tp) * t.head_dim * kv_bytes


def engine_weight_bytes(arch: QwenVLArch, engine_tp: int, b: int = 2) -> int:
    """The engine's weights on one GPU: SGLang shards the decoder, vocabulary and vision tower over its TP."""
    return total_parameters(arch) * b // engine_tp
