"""The public kernels of `pebr_mega.kernels.ops`: fused log-probs/entropy and the fused GRPO loss.

`kernels/` has no `__init__.py` on purpose: it is installed as the namespace package `pebr_mega.kernels`
(setup.py), and a checkout on `sys.path` must not shadow Hugging Face's `kernels` distribution, which
transformers imports (PEP 420: a regular package anywhere on the path outranks a namespace portion).

Public functions (each differentiable):

- ``logprobs(logits, token_ids, ...)``: per-token log-probs (and entropy) from logits, one pass, no
  ``[N, V]`` float32 intermediate; vocab-parallel with ``tp_group``.
- ``linear_logprobs(hidden, weight, token_ids, ...)``: the same straight from hidden states and the
  lm_head weight, chunked over rows so the full logits never exist.
- ``grpo_loss(logprobs, old_logprobs, advantages, mask, ...)``: PPO-clip + dual-clip + KL + masking +
  aggregation fused; matches `pebr_mega.kernels.reference.grpo_loss_reference`.

Dispatch: CUDA tensors run the Triton kernels; CPU tensors run the same kernels in Triton's interpreter
when ``TRITON_INTERPRET=1`` is set (the tests), otherwise the torch references of `reference.py` (the CPU
demo); float64 inputs always take the references. Triton is imported only when a kernel runs, so this
package imports on machines without it.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .reference import (METRIC_NAMES, check_loss_inputs, grpo_loss_reference, linear_logprobs_reference,
                        logprobs_reference)

__all__ = ["grpo_loss", "linear_logprobs", "logprobs", "use_triton"]


def use_triton(t: Tensor) -> bool:
    """Whether the Triton kernels handle tensors like ``t`` (see the module docstring)."""
    if t.dtype == torch.float64:
        return False
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _check_token_ids(token_ids: Tensor, n_vocab: int) -> None:
    if token_ids.is_floating_point():
        raise TypeError(f"token_ids must be integers, got {token_ids.dtype}")
    if token_ids.is_cuda:  # no host sync: the check fails the stream instead
        torch._assert_async(((token_ids >= 0) & (token_ids < n_vocab)).all(), "token_ids outside [0, V)")
        return
    bad = ((token_ids < 0) | (token_ids >= n_vocab)).nonzero()
    if len(bad):
        where = tuple(bad[0].tolist())
        raise ValueError(f"token_ids{list(where)} = {int(token_ids[where])} is outside the vocabulary [0, {n_vocab})")


def _vocab_size(n_local: int, tp_group) -> int:
    if tp_group is None:
        return n_local
    import torch.distributed as dist

    return n_local * dist.get_world_size(tp_group)


def logprobs(
    logits: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    tp_group=None,
    *,
    inplace_backward: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature) at ``token_ids``, and the entropy of that distribution if asked.

    logits: ``[..., V]`` bf16/fp16/fp32; with ``tp_group`` this rank's equal, contiguous vocabulary
        slice ``[..., V / world]`` (Megatron's vocab-parallel layout). Rows may have any common stride;
        logits whose rows cannot be flattened to one stride (e.g. ``x[:, :-1]`` of a ``[B, T, V]``
        batch) are copied first: rather pass every position (any valid id where unused) and slice
        the output.
    token_ids: ``[...]`` integer ids into the full vocabulary.
    Returns float32 ``[...]`` log-probs and entropy (None unless ``return_entropy``). Gradients flow to
    ``logits`` from both outputs. With ``tp_group``, every rank must use the outputs identically (they are
    replicated) and each gets the gradient of its own slice.
    ``inplace_backward=True`` writes the logits gradient over the logits' storage instead of allocating
    another ``[N, V]`` tensor: only for logits nothing else reads afterwards (e.g. a fresh lm_head output).
    """
    if logits.dim() < 1 or token_ids.shape != logits.shape[:-1]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must be logits shape {tuple(logits.shape)} "
                         "without its last (vocabulary) dimension")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_token_ids(token_ids, _vocab_size(logits.shape[-1], tp_group))
    if not use_triton(logits):
        return logprobs_reference(logits, token_ids, temperature, return_entropy, tp_group)
    from ._logprobs_triton import FusedLogprobs

    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    logp, ent = FusedLogprobs.apply(flat, token_ids.reshape(-1).contiguous(), float(temperature), return_entropy,
                                    tp_group, inplace_backward)
    shape = token_ids.shape
    return logp.view(shape), (ent.view(shape) if ent is not None else None)


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    tp_group=None,
    *,
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``logprobs(hidden @ weight.T, token_ids, ...)`` without ever holding the full logits.

    hidden: ``[..., H]``; weight: ``[V, H]`` (with ``tp_group``: this rank's vocabulary slice
    ``[V / world, H]``, hidden replicated). Rows are processed ``chunk_rows`` at a time (default: about
    2^28 logits per chunk); backward recomputes each chunk's logits. With ``tp_group`` the hidden-state
    gradient is all-reduced over the group inside backward (the full gradient on every rank, as a
    ColumnParallelLinear with all-reduced input gradient): do not reduce it again.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if token_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must be hidden shape {tuple(hidden.shape)} "
                         "without its last dimension")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_token_ids(token_ids, _vocab_size(weight.shape[0], tp_group))
    if not use_triton(hidden):
        return linear_logprobs_reference(hidden, weight, token_ids, temperature, return_entropy, tp_group)
    from ._linear_triton import FusedLinearLogprobs, default_chunk_rows

    flat = hidden.reshape(-1, hidden.shape[-1]).contiguous()
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    logp, ent = FusedLinearLogprobs.apply(flat, weight, token_ids.reshape(-1).contiguous(), float(temperature),
                                          return_entropy, tp_group, rows)
    shape = token_ids.shape
    return logp.view(shape), (ent.view(shape) if ent is not None else None)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    clip_dual: float = 3.0,
    kl_coef: float = 0.01,
    kl_type: str = "low_var_kl",
    agg: str = "token-mean",
    *,
    entropy: Tensor | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss, fused: see `pebr_mega.kernels.reference.grpo_loss_reference` for the formulas and the metrics.

    All tensors ``[B, T]`` (advantages broadcast per token, mask nonzero on response tokens). Only
    ``logprobs`` receives a gradient. ``denominator`` replaces the batch's own token (token-mean) or
    sequence (seq-mean-*) count, for a loss normalised over several micro-batches or ranks. Returns the
    scalar loss (float32) and metrics as 0-dim float32 tensors (no host sync).
    """
    check_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, kl_type, agg)
    if not use_triton(logprobs):
        return grpo_loss_reference(logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
                                   clip_dual, kl_coef, kl_type, agg, entropy, denominator)
    from ._grpo_loss_triton import FusedGrpoLoss

    params = (clip_low, clip_high, clip_dual, kl_coef, kl_type, agg, denominator)
    loss, packed = FusedGrpoLoss.apply(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, params)
    absent = {"kl_loss"} if ref_logprobs is None else set()
    absent |= {"entropy"} if entropy is None else set()
    return loss, {n: v for n, v in zip(METRIC_NAMES, packed.unbind(0)) if n not in absent}
