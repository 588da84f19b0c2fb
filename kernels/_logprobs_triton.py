"""Fused per-token log-probs and entropy from logits: the Triton kernels and their autograd function.

Imported lazily by `pebr_mega.kernels` (never at package import), because `triton.jit` decides at
decoration time whether the kernels run compiled (CUDA) or in the interpreter (`TRITON_INTERPRET=1`).

Notation for one row (token position): x = logits (the rank's slice with tensor parallelism),
z = x / T (temperature), lse = log sum_j exp z_j, p = softmax(z), log p_j = z_j - lse, y = target.

Forward, one pass over the vocabulary in BLOCK_V chunks with an online log-sum-exp. Carried per row:
    m = max of z seen so far,  s = sum_j exp(z_j - m),  t = sum_j exp(z_j - m) (z_j - m)
When the running max moves from m to m', every term is rebased by alpha = exp(m - m'):
    s' = alpha s + sum_chunk exp(z - m')
    t' = alpha (t + (m - m') s) + sum_chunk exp(z - m') (z - m')       [since z - m' = (z - m) + (m - m')]
At the end lse = m + log s and, with sum_j p_j z_j = m + t / s,
    H = -sum_j p_j log p_j = lse - sum_j p_j z_j = log s - t / s.
Keeping t relative to the running max avoids the cancellation of lse - sum p z when logits are large.
-inf logits (vocabulary padding) contribute exp(-inf) = 0 and are kept out of t explicitly (0 * -inf).

Vocab-parallel: each rank runs the same loop on its slice and returns (m_r, s_r, t_r, z_y if it owns y
else 0). Then M = max_r m_r (all-reduce MAX) and, rebasing each rank's sums to M with a_r = exp(m_r - M),
    S = sum_r a_r s_r,   T' = sum_r a_r (t_r + (m_r - M) s_r),   z_y = sum_r (owned_r z_y)
in one all-reduce SUM; then lse = M + log S and H = log S - T'/S as above.

Backward, one pass per row. With upstream gradients g = dL/d log p_y and h = dL/dH:
    d log p_y / d z_j = [j = y] - p_j
    dH / d z_j        = -p_j (z_j - sum_k p_k z_k) = -p_j (log p_j + H)
(from dp_k/dz_j = p_k([k = j] - p_j) and H = lse - sum_k p_k z_k), and dz_j/dx_j = 1/T, so
    dL/dx_j = (g ([j = y] - p_j) - h p_j (log p_j + H)) / T,
recomputing p_j = exp(z_j - lse) from the saved lse. Every rank writes its own slice; no communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch import Tensor

# Vocabulary chunk per loop iteration (a power of two) and warps per program (None: 4 up to 1024, else 8).
# Untuned first choices; tools/bench_kernels.py --sweep times alternatives. The tests lower MAX_BLOCK_V to
# cross chunk boundaries.
MAX_BLOCK_V = 4096
NUM_WARPS: int | None = None


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, stride_row, targets_ptr, vocab_start, n_vocab, temperature,
    out0_ptr, out1_ptr, out2_ptr, out3_ptr,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr, PARTIAL: tl.constexpr,
):
    # One program per row. PARTIAL=False writes (log p_y, lse, H); PARTIAL=True writes this rank's
    # (m, s, t, z_y or 0) for the cross-rank reduction.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    t = tl.full([], 0.0, tl.float32)
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # While everything seen is -inf, rebase to 0 instead: exp(-inf - -inf) would be NaN.
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_base)
        e = tl.exp(z - m_base)
        if WITH_ENTROPY:
            # Select before multiplying so that no 0 * -inf is ever formed (s > 0 implies m finite).
            shift = tl.where(s > 0.0, m - m_base, 0.0) * s
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0.0, z - m_base, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    target = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    owned = (target >= 0) & (target < n_vocab)
    z_target = tl.load(row_ptr + target, mask=owned, other=0.0).to(tl.float32) / temperature
    if PARTIAL:
        tl.store(out0_ptr + row, m)
        tl.store(out1_ptr + row, s)
        tl.store(out3_ptr + row, z_target)
        if WITH_ENTROPY:
            tl.store(out2_ptr + row, t)
    else:
        log_s = tl.log(s)
        lse = m + log_s
        tl.store(out0_ptr + row, z_target - lse)
        tl.store(out1_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(out2_ptr + row, log_s - t / s)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, stride_row, dlogits_ptr, stride_drow, targets_ptr, vocab_start, n_vocab, temperature,
    lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    BLOCK_V: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
):
    # dL/dx_j = (g ([j = y] - p_j) - h p_j (log p_j + H)) / T; see the module docstring.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    drow_ptr = dlogits_ptr + row * stride_drow
    offs = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    target = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
    if HAS_GLP:
        g = tl.load(glp_ptr + row)
    else:
        g = 0.0
    if HAS_GENT:
        h = tl.load(gent_ptr + row)
        ent = tl.load(ent_ptr + row)
    inv_t = 1.0 / temperature
    for start in range(0, n_vocab, BLOCK_V):
        cols = start + offs
        inside = cols < n_vocab
        log_p = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32) / temperature - lse
        p = tl.exp(log_p)
        d = tl.where(cols == target, g, 0.0) - g * p
        if HAS_GENT:
            d -= h * p * (tl.where(p > 0.0, log_p, 0.0) + ent)  # p = 0 at -inf logits: no 0 * -inf
        tl.store(drow_ptr + cols, (d * inv_t).to(dlogits_ptr.dtype.element_ty), mask=inside)


def _block_v(n_vocab: int) -> int:
    return max(16, min(MAX_BLOCK_V, triton.next_power_of_2(n_vocab)))


def _num_warps(block: int) -> int:
    return NUM_WARPS or (4 if block <= 1024 else 8)


def vocab_layout(n_local: int, tp_group) -> tuple[int, int]:
    """(first vocabulary id of this rank's slice, full vocabulary size) for equal contiguous slices."""
    if tp_group is None:
        return 0, n_local
    return dist.get_rank(tp_group) * n_local, dist.get_world_size(tp_group) * n_local


def forward_stats(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool, tp_group=None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per row of ``logits [N, V_local]``: (log p_y, lse, H or None), all float32 ``[N]``."""
    n_rows, n_vocab = logits.shape
    vocab_start, _ = vocab_layout(n_vocab, tp_group)
    outs = [torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(4)]
    block = _block_v(n_vocab)
    if n_rows:
        _logprobs_fwd_kernel[(n_rows,)](
            logits, logits.stride(0), targets, vocab_start, n_vocab, float(temperature), *outs,
            BLOCK_V=block, WITH_ENTROPY=with_entropy, PARTIAL=tp_group is not None, num_warps=_num_warps(block),
        )
    if tp_group is None:
        logp, lse, ent, _ = outs
        return logp, lse, (ent if with_entropy else None)
    return _combine_ranks(*outs, with_entropy, tp_group)


def _combine_ranks(m: Tensor, s: Tensor, t: Tensor, z_target: Tensor, with_entropy: bool, group):
    big_m = m.clone()
    dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    base = torch.where(big_m == float("-inf"), torch.zeros_like(big_m), big_m)
    scale = torch.exp(m - base)  # 0 for a rank whose slice of the row is all -inf
    packed = [s * scale, z_target]
    if with_entropy:
        shift = torch.where(s > 0, m - base, torch.zeros_like(s)) * s  # no -inf * 0
        packed.append((t + shift) * scale)
    packed = torch.stack(packed)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    log_s = torch.log(packed[0])
    lse = big_m + log_s
    ent = log_s - packed[2] / packed[0] if with_entropy else None
    return packed[1] - lse, lse, ent


def backward_dlogits(
    logits: Tensor, targets: Tensor, temperature: float, lse: Tensor, ent: Tensor | None,
    grad_logp: Tensor | None, grad_ent: Tensor | None, out: Tensor, tp_group=None,
) -> Tensor:
    """Write dL/dlogits into ``out`` (may be ``logits`` itself: each element is read before it is written)."""
    n_rows, n_vocab = logits.shape
    vocab_start, _ = vocab_layout(n_vocab, tp_group)
    has_glp, has_gent = grad_logp is not None, grad_ent is not None
    glp = grad_logp.float().contiguous() if has_glp else lse
    gent = grad_ent.float().contiguous() if has_gent else lse
    block = _block_v(n_vocab)
    if n_rows:
        _logprobs_bwd_kernel[(n_rows,)](
            logits, logits.stride(0), out, out.stride(0), targets, vocab_start, n_vocab, float(temperature),
            lse, ent if ent is not None else lse, glp, gent,
            BLOCK_V=block, HAS_GLP=has_glp, HAS_GENT=has_gent, num_warps=_num_warps(block),
        )
    return out


class FusedLogprobs(torch.autograd.Function):
    """(logits [N, V_local], targets [N]) -> (log p_y [N] float32, H [N] float32 or None)."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, tp_group, inplace_backward):
        logp, lse, ent = forward_stats(logits, targets, temperature, with_entropy, tp_group)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, lse, ent)
        ctx.temperature, ctx.tp_group, ctx.inplace_backward = temperature, tp_group, inplace_backward
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, targets, lse, ent = ctx.saved_tensors
        if grad_logp is None and grad_ent is None:
            return (None,) * 6
        out = logits if ctx.inplace_backward else torch.empty_like(logits)
        backward_dlogits(logits, targets, ctx.temperature, lse, ent, grad_logp, grad_ent, out, ctx.tp_group)
        return out, None, None, None, None, None
