"""Model FLOPs of Qwen2.5-VL (matmul FLOPs: 2 per multiply-add), for TFLOP/s and MFU reporting.

Forward FLOPs of one sequence of `s` tokens through the decoder, per layer (h hidden, f FFN, np query heads,
ng key/value heads, d head dim):
    qkv 2*s*h*(np + 2*ng)*d + out proj 2*s*np*d*h + SwiGLU 3 * 2*s*h*f
    + attention QK^T and AV: 2 * 2*np*d*s^2, halved for causal attention (flash skips the upper triangle);
plus the output layer 2*s*h*V. The vision tower, per image of N patches (width c, FFN fi): patch embedding
2*N*c*(C*T*P*P), per block qkv/proj/SwiGLU 2*N*(3c*c + c*c + 3*c*fi) and attention 4*c*sum(L_i^2) over
its segments (windows, or whole frames in full-attention blocks), the merger 2*(N/m^2)*(4c*4c + 4c*h).
Training = 3 x forward (backward computes two matmuls per forward matmul). Elementwise work is not counted,
which is the usual convention for "model FLOPs".
"""
from __future__ import annotations

import torch

from pebr_mega.models.arch import QwenVLArch, TextArch, VisionArch
from pebr_mega.models.vision import frame_lengths, window_order


def decoder_forward_flops(t: TextArch, seq: int, causal: bool = True) -> int:
    """Forward matmul FLOPs of the decoder and output layer for one sequence of `seq` tokens."""
    h, f, np_, ng, d = t.hidden_size, t.intermediate_size, t.num_heads, t.num_kv_heads, t.head_dim
    dense = 2 * seq * h * (np_ + 2 * ng) * d + 2 * seq * np_ * d * h + 3 * 2 * seq * h * f
    attn = 2 * 2 * np_ * d * seq * seq
    if causal:
        attn //= 2
    return t.num_layers * (dense + attn) + 2 * seq * h * t.vocab_size


def vision_forward_flops(v: VisionArch, grid_thw: torch.Tensor) -> int:
    """Forward matmul FLOPs of the vision tower for the images described by `grid_thw` [n, 3]."""
    n = int(grid_thw.prod(-1).sum())
    c, fi = v.hidden_size, v.intermediate_size
    patch = 2 * n * c * v.in_channels * v.temporal_patch_size * v.patch_size**2
    _, windows = window_order(grid_thw.cpu(), v.spatial_merge_size, v.window_size // v.spatial_merge_size // v.patch_size)
    frames = frame_lengths(grid_thw)
    blocks = 0
    for i in range(v.depth):
        segs = frames if i in v.fullatt_block_indexes else windows
        blocks += 2 * n * (3 * c * c + c * c + 3 * c * fi) + 4 * c * sum(L * L for L in segs)
    m2 = v.spatial_merge_size**2
    merger = 2 * (n // m2) * (m2 * c * m2 * c + m2 * c * v.out_hidden_size)
    return patch + blocks + merger


def train_step_flops(arch: QwenVLArch, seq: int, grid_thw: torch.Tensor | None = None, batch: int = 1,
                     causal: bool = True) -> int:
    """Model FLOPs of forward + backward for `batch` sequences of `seq` tokens with the given images."""
    fwd = batch * decoder_forward_flops(arch.text, seq, causal)
    if grid_thw is not None and len(grid_thw):
        fwd += vision_forward_flops(arch.vision, grid_thw)
    return 3 * fwd
