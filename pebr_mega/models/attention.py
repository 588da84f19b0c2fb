"""Attention over packed variable-length segments in one call: the `torch` spec's core attention and the ViT's.

A packed row holds segments back to back (the samples of a micro-batch, or the windows / frames of the
images); each segment attends only to itself, causally for text, bidirectionally in the vision tower.
Whatever the number of segments, one attention kernel runs per call (per layer), and nothing here reads a
device value on the host: the segment layout (`Segments`) is computed once, on the host, where the
micro-batch is packed (or the images' windows are planned) and moved to the device with it.

Backends (`ModelConfig.attention`):

- `flash_attn`: flash-attn's `flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, softmax_scale, causal)` (flash_attn/flash_attn_interface.py); grouped-query
  heads natively. CUDA, fp16/bf16.
- `varlen`: torch's `torch.nn.attention.varlen.varlen_attn`, the same flash kernels without the package.
  Its signature moved between releases, so the call adapts to what the installed torch offers (read from
  torch's source): torch 2.10 takes `is_causal=`; later releases take `window_size=(-1, 0)` for causal and
  `scale=`; `enable_gqa=` exists in torch 2.13 but not in every release before it, and without it the
  key/value heads are repeated to the query heads. CUDA, fp16/bf16.
- `sdpa`: the segments gathered into a padded `[n, max_len]` batch and one
  `torch.nn.functional.scaled_dot_product_attention` call, then scattered back. Causal attention needs no
  mask: a real query at offset i only sees keys at offsets <= i, all inside its segment; the padded
  queries see junk and are dropped, and their zero output gradient makes every gradient into a padded
  slot exactly zero. Bidirectional attention masks the padded keys, unless every segment has the same
  length (image windows). With no mask SDPA runs its flash kernels (CUDA, and CPU: memory
  O(n * max_len * heads * head_dim), never O(T^2)); the masked case holds n * heads * max_len^2 scores.
  Any device and dtype (float64 in tests): the CPU path and the fp32 path on CUDA.

`auto` = `flash_attn` if it imports, else `varlen` if torch has it, for CUDA fp16/bf16 inputs with head
dims flash supports; `sdpa` otherwise (and whenever attention dropout is active in training: the varlen
kernels run without dropout).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pebr_mega.errors import BackendUnavailableError
from pebr_mega.versions import require_in_window

ATTENTION_BACKENDS = ("auto", "varlen", "flash_attn", "sdpa")
FLASH_ATTN_INSTALL = 'pip install --no-build-isolation -e ".[flash-attn]"  # setup.py\'s flash-attn window'
_HALF = (torch.float16, torch.bfloat16)
_MAX_FLASH_HEAD_DIM = 256


@dataclass
class Segments:
    """Where the segments of one packed row lie, and how to pad them into a batch and back.

    cu_seqlens [n + 1] int32: segment boundaries (no empty segments); max_len: the longest segment;
    slots [n, max_len] long: the packed index of every slot of the padded batch (slots past a segment's end
    point at the next tokens, clamped into the row: their values are never used); tokens [T] long: the flat
    slot (row * max_len + offset) of every packed token; uniform: every segment has max_len tokens.
    """

    cu_seqlens: Tensor
    max_len: int
    slots: Tensor
    tokens: Tensor
    uniform: bool

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str | None = None) -> "Segments":
        """The layout of segments of the given lengths (computed on the host, then moved to `device`)."""
        lens = [int(n) for n in lengths if int(n) > 0]
        if not lens:
            raise ValueError("a packed row needs at least one non-empty segment")
        L, total = max(lens), sum(lens)
        length = torch.tensor(lens)
        start = torch.cumsum(length, 0) - length
        slots = (start[:, None] + torch.arange(L)[None, :]).clamp(max=total - 1)
        row = torch.repeat_interleave(torch.arange(len(lens)), length)
        offset = torch.arange(total) - start[row]
        cu = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(length, 0)]).to(torch.int32)
        seg = cls(cu, L, slots, row * L + offset, all(n == L for n in lens))
        return seg.to(device) if device is not None else seg

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor, max_len: int, total: int) -> "Segments":
        """The layout from Megatron-style boundaries already on the device (no host sync).

        `cu_seqlens` must cover the whole row (cu_seqlens[-1] == total); empty segments are allowed.
        """
        if not cu_seqlens.is_cuda and int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens end at {int(cu_seqlens[-1])} but the packed row has {total} tokens: "
                             "give trailing padding a segment of its own")
        dev = cu_seqlens.device
        cu = cu_seqlens.long()
        slots = (cu[:-1, None] + torch.arange(max_len, device=dev)[None, :]).clamp(max=total - 1)
        token = torch.arange(total, device=dev)
        row = torch.searchsorted(cu[1:], token, right=True)
        return cls(cu_seqlens.to(torch.int32), int(max_len), slots, row * max_len + token - cu[row], False)

    def to(self, device: torch.device | str) -> "Segments":
        """The same layout with its index tensors on `device` (asynchronous copies)."""
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
        return Segments(move(self.cu_seqlens), self.max_len, move(self.slots), move(self.tokens), self.uniform)

    @property
    def total(self) -> int:
        """Tokens in the packed row."""
        return int(self.tokens.shape[0])


def flash_attn_available() -> bool:
    """Whether flash-attn's varlen function imports."""
    return _flash_attn_varlen() is not None


@functools.lru_cache(maxsize=1)
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=1)
def _torch_varlen():
    """(varlen_attn, its parameter names) or None when this torch has no varlen attention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def torch_varlen_available() -> bool:
    """Whether this torch has `torch.nn.attention.varlen.varlen_attn`."""
    return _torch_varlen() is not None


def check_backend(choice: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise BackendUnavailableError when an explicitly chosen backend cannot run here (start-up check)."""
    if choice not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {choice!r} is not one of {list(ATTENTION_BACKENDS)}")
    if choice == "flash_attn" or (choice == "auto" and device.type == "cuda" and flash_attn_available()):
        require_in_window("flash_attn")  # the flash-attn that would run is one the code was read against
    if choice in ("auto", "sdpa"):
        return
    if device.type != "cuda" or dtype not in _HALF:
        raise BackendUnavailableError(
            f"model.attention={choice} runs flash kernels: CUDA with bfloat16/float16 parameters only "
            f"(here {device.type}, {str(dtype).replace('torch.', '')}); use model.attention=auto or sdpa")
    if choice == "flash_attn" and not flash_attn_available():
        raise BackendUnavailableError(
            f"model.attention=flash_attn needs flash-attn, which does not import here; install it with "
            f"`{FLASH_ATTN_INSTALL}`, or use model.attention=varlen (torch's own) or auto")
    if choice == "varlen" and not torch_varlen_available():
        raise BackendUnavailableError(
            f"model.attention=varlen needs torch.nn.attention.varlen (torch >= 2.10; this is {torch.__version__}); "
            "use model.attention=auto or sdpa")


def pick_backend(choice: str, q: Tensor, dropout: float = 0.0) -> str:
    """The backend that runs for these inputs (see the module docstring for `auto`)."""
    if choice != "auto":
        return "sdpa" if dropout > 0 else choice
    if dropout > 0 or not q.is_cuda or q.dtype not in _HALF or q.shape[-1] > _MAX_FLASH_HEAD_DIM:
        return "sdpa"
    if flash_attn_available():
        return "flash_attn"
    return "varlen" if torch_varlen_available() else "sdpa"


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, segments: Segments, causal: bool,
                     scale: float | None = None, backend: str = "auto", dropout: float = 0.0) -> Tensor:
    """Attention inside each segment of a packed row, in one kernel call.

    q [T, heads, d], k/v [T, kv_heads, d] (grouped-query: heads a multiple of kv_heads), the segments as
    `Segments` on q's device. Returns [T, heads, d]. `scale` defaults to 1/sqrt(d).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    which = pick_backend(backend, q, dropout)
    if which == "flash_attn":
        cu, L = segments.cu_seqlens, segments.max_len
        return _flash_attn_varlen()(q, k, v, cu, cu, L, L, dropout_p=0.0, softmax_scale=scale, causal=causal)
    if which == "varlen":
        return _torch_varlen_call(q, k, v, segments, causal, scale)
    return _padded_sdpa(q, k, v, segments, causal, scale, dropout)


def _torch_varlen_call(q: Tensor, k: Tensor, v: Tensor, seg: Segments, causal: bool, scale: float) -> Tensor:
    varlen_attn, params = _torch_varlen()
    kwargs: dict = {}
    if "window_size" in params:  # torch >= 2.11: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:  # torch 2.10
        kwargs["is_causal"] = causal
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, 1.0 / math.sqrt(q.shape[-1])):
        q = q * (scale * math.sqrt(q.shape[-1]))  # the kernel applies 1/sqrt(d)
    cu, L = seg.cu_seqlens, seg.max_len
    return varlen_attn(q, k, v, cu, cu, L, L, **kwargs)


def _padded_sdpa(q: Tensor, k: Tensor, v: Tensor, seg: Segments, causal: bool, scale: float,
                 dropout: float) -> Tensor:
    n, L = seg.slots.shape
    heads, d = q.shape[1], q.shape[2]
    qb, kb, vb = (t[seg.slots].transpose(1, 2) for t in (q, k, v))  # [n, heads, L, d]
    mask = None
    if not causal and not seg.uniform:
        lengths = seg.cu_seqlens[1:] - seg.cu_seqlens[:-1]
        mask = (torch.arange(L, device=q.device)[None, :] < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal, scale=scale,
                                         dropout_p=dropout, enable_gqa=kb.shape[1] != heads)
    return out.transpose(1, 2).reshape(n * L, heads, d)[seg.tokens]
