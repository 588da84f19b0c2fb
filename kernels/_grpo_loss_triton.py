"""The fused GRPO loss: one Triton pass over the ``[B, T]`` token tensors, forward and gradient together.

The formulas are those of `pebr_mega.kernels.reference.grpo_loss_reference` (documented there). Per token, with lr = log pi - log pi_old:

    r  = exp(clamp(lr, -20, 20))
    L1 = -A r,  L2 = -A clamp(r, 1 - cl, 1 + ch),  Lc = max(L1, L2),  L = min(Lc, -A c) if A < 0 else Lc
    dL/d log pi = -A r   when the unclipped branch decides (L1 >= L2, dual clip inactive, |lr| <= 20)
                = 0      otherwise (the clamp, the dual-clip constant or the lr clamp decides)
    KL (delta = log pi_ref - log pi):
        k1 = -delta                       d/d log pi = 1
        k2 = delta^2 / 2                  d/d log pi = -delta
        k3 = clamp(exp(d) - d - 1, +-10), d = clamp(delta, +-20)
                                          d/d log pi = 1 - exp(d) inside both clamps, else 0
(ties of max/min are measure-zero; where L1 = L2 with r inside the bounds both branches have slope -A).

Aggregation is linear in the per-token losses: loss = sum_b w_b sum_t mask_bt (L_bt + kl_coef KL_bt) with a
per-row weight w_b fixed by the mode and the counts (`reference.row_weights`): w_b = s for token-mean and
seq-mean-token-sum, s / n_b for seq-mean-token-mean, with s = 1 / (the given denominator, or the batch's
token count, or its count of non-empty rows) and n_b the row's token count. So the work is three launches,
none of them ``[B]``-sized torch glue (at 1M tokens the whole memory floor is a few microseconds, so the
loss must not be launch-bound):

1. `_grpo_loss_fwd_kernel`, one program per (row, tile of BLOCK_T tokens): the masked sums the loss and
   metrics need, and the per-token derivative D_bt = mask_bt (dL/d log pi + kl_coef dKL/d log pi), which
   does not depend on w;
2. `_grpo_loss_finish_kernel`, one program: sums the tiles of every row, forms s, the loss, the aggregated
   pg/kl losses and the token means, and keeps n_b per row and s for backward;
3. backward, `_grpo_loss_bwd_kernel`: d loss / d log pi_bt = grad * s * D_bt (/ n_b), in the input dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import LOG_RATIO_CLAMP, LOW_VAR_KL_CLAMP, METRIC_NAMES

MAX_BLOCK_T = 1024  # tokens per program; the tests lower it to get several tiles per row
N_STATS = 9  # loss, count, pg, kl, clipped, dual-clipped, -lr, -log pi, entropy (masked sums)
_KL_CODES = {None: 0, "k1": 1, "k2": 2, "low_var_kl": 3}
# clip_dual = inf disables the dual clip; the kernel gets the largest float32 instead, which selects the
# same branches and keeps -A * c at A = 0 equal to 0 rather than 0 * inf = NaN.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@triton.jit
def _grpo_loss_fwd_kernel(
    lp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, ent_ptr, dtok_ptr, stats_ptr,
    n_cols, n_tiles, clip_low, clip_high, clip_dual, kl_coef, ratio_clamp, kl_clamp,
    KL_TYPE: tl.constexpr, HAS_ENT: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_T: tl.constexpr,
    N_STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    cols = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < n_cols
    idx = row * n_cols + cols
    keep = (tl.load(mask_ptr + idx, mask=inside, other=0) != 0) & inside
    lp = tl.load(lp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + idx, mask=inside, other=0.0).to(tl.float32)

    log_ratio = lp - old
    lr_free = (log_ratio >= -ratio_clamp) & (log_ratio <= ratio_clamp)
    log_ratio = tl.minimum(tl.maximum(log_ratio, -ratio_clamp), ratio_clamp)
    ratio = tl.exp(log_ratio)
    loss1 = -adv * ratio
    loss2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss_ppo = tl.maximum(loss1, loss2)
    loss_dual = -adv * clip_dual
    negative = adv < 0.0
    dual = negative & (loss_ppo > loss_dual)
    pg = tl.where(negative, tl.minimum(loss_ppo, loss_dual), loss_ppo)
    clipped = loss2 > loss1
    d_total = tl.where(lr_free & ~(dual | clipped), -adv * ratio, 0.0)

    if KL_TYPE == 0:
        kl = tl.zeros_like(pg)
        total = pg
    else:
        ref = tl.load(ref_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        if KL_TYPE == 1:
            kl = lp - ref
            d_kl = tl.full(kl.shape, 1.0, tl.float32)
        elif KL_TYPE == 2:
            kl = 0.5 * (lp - ref) * (lp - ref)
            d_kl = lp - ref
        else:
            delta = ref - lp
            delta_c = tl.minimum(tl.maximum(delta, -ratio_clamp), ratio_clamp)
            e = tl.exp(delta_c)
            k3 = e - delta_c - 1.0
            free = (delta >= -ratio_clamp) & (delta <= ratio_clamp) & (k3 >= -kl_clamp) & (k3 <= kl_clamp)
            kl = tl.minimum(tl.maximum(k3, -kl_clamp), kl_clamp)
            d_kl = tl.where(free, 1.0 - e, 0.0)
        total = pg + kl_coef * kl
        d_total += kl_coef * d_kl

    if NEED_GRAD:
        tl.store(dtok_ptr + idx, tl.where(keep, d_total, 0.0), mask=inside)

    out = stats_ptr + (row * n_tiles + tile) * N_STATS
    tl.store(out + 0, tl.sum(tl.where(keep, total, 0.0), axis=0))
    tl.store(out + 1, tl.sum(keep.to(tl.float32), axis=0))
    tl.store(out + 2, tl.sum(tl.where(keep, pg, 0.0), axis=0))
    tl.store(out + 3, tl.sum(tl.where(keep, kl, 0.0), axis=0))
    tl.store(out + 4, tl.sum((keep & clipped).to(tl.float32), axis=0))
    tl.store(out + 5, tl.sum((keep & dual).to(tl.float32), axis=0))
    tl.store(out + 6, tl.sum(tl.where(keep, -log_ratio, 0.0), axis=0))
    tl.store(out + 7, tl.sum(tl.where(keep, -lp, 0.0), axis=0))
    if HAS_ENT:
        ent = tl.load(ent_ptr + idx, mask=inside, other=0.0).to(tl.float32)
        tl.store(out + 8, tl.sum(tl.where(keep, ent, 0.0), axis=0))
    else:
        tl.store(out + 8, 0.0)


@triton.jit
def _grpo_loss_finish_kernel(
    stats_ptr, row_count_ptr, loss_ptr, metrics_ptr, scale_ptr, denom_ptr, denom_value,
    n_rows, n_tiles, AGG: tl.constexpr, DENOM: tl.constexpr, BLOCK_B: tl.constexpr, N_STATS: tl.constexpr,
    STAT_COLS: tl.constexpr,
):
    # AGG: 0 token-mean, 1 seq-mean-token-sum, 2 seq-mean-token-mean. DENOM: 0 none, 1 value, 2 pointer.
    cols = tl.arange(0, STAT_COLS)
    col_ok = cols < N_STATS
    totals = tl.zeros((STAT_COLS,), tl.float32)  # sum over rows of each statistic
    per_seq = tl.zeros((STAT_COLS,), tl.float32)  # sum over rows of (row sum / row count)
    nonempty = tl.zeros((BLOCK_B,), tl.float32)
    for start in range(0, n_rows, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        row_ok = rows < n_rows
        acc = tl.zeros((BLOCK_B, STAT_COLS), tl.float32)
        base = rows.to(tl.int64)[:, None] * n_tiles * N_STATS + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        for tile in range(0, n_tiles):
            acc += tl.load(stats_ptr + base + tile * N_STATS, mask=ok, other=0.0)
        count = tl.sum(tl.where(cols[None, :] == 1, acc, 0.0), axis=1)
        tl.store(row_count_ptr + rows, count, mask=row_ok)
        totals += tl.sum(acc, axis=0)
        per_seq += tl.sum(acc / tl.maximum(count, 1.0)[:, None], axis=0)
        nonempty += tl.where(row_ok & (count > 0), 1.0, 0.0)
    tokens = tl.sum(tl.where(cols == 1, totals, 0.0), axis=0)
    if DENOM == 1:
        n = denom_value
    elif DENOM == 2:
        n = tl.load(denom_ptr).to(tl.float32)
    elif AGG == 0:
        n = tl.maximum(tokens, 1.0)
    else:
        n = tl.maximum(tl.sum(nonempty, axis=0), 1.0)
    scale = 1.0 / n
    if AGG == 2:
        weighted = per_seq * scale
    else:
        weighted = totals * scale
    means = totals / tl.maximum(tokens, 1.0)
    tl.store(loss_ptr, tl.sum(tl.where(cols == 0, weighted, 0.0), axis=0))
    tl.store(scale_ptr, scale)
    # metrics: aggregated pg (stat 2) and kl (stat 3), then the token means of stats 4..8
    tl.store(metrics_ptr + 0, tl.sum(tl.where(cols == 2, weighted, 0.0), axis=0))
    tl.store(metrics_ptr + 1, tl.sum(tl.where(cols == 3, weighted, 0.0), axis=0))
    for k in tl.static_range(4, N_STATS):
        tl.store(metrics_ptr + (k - 2), tl.sum(tl.where(cols == k, means, 0.0), axis=0))


@triton.jit
def _grpo_loss_bwd_kernel(dtok_ptr, row_count_ptr, scale_ptr, grad_loss_ptr, grad_ptr, n_cols,
                          PER_ROW: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    inside = cols < n_cols
    w = tl.load(grad_loss_ptr).to(tl.float32) * tl.load(scale_ptr)
    if PER_ROW:
        w = w / tl.maximum(tl.load(row_count_ptr + row), 1.0)
    d = tl.load(dtok_ptr + row * n_cols + cols, mask=inside, other=0.0)
    tl.store(grad_ptr + row * n_cols + cols, d * w, mask=inside)


def _flat_input(t: Tensor) -> Tensor:
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


_AGG_CODES = {"token-mean": 0, "seq-mean-token-sum": 1, "seq-mean-token-mean": 2}
FINISH_BLOCK_B = 64  # rows per step of the finishing program's loop


def _block_t(n_cols: int) -> int:
    return max(16, min(MAX_BLOCK_T, triton.next_power_of_2(max(n_cols, 1))))


class FusedGrpoLoss(torch.autograd.Function):
    """(logprobs, old, advantages, mask, ref or None, entropy or None, params) -> (loss, metrics [7])."""

    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy, params):
        clip_low, clip_high, clip_dual, kl_coef, kl_type, agg, denominator = params
        n_rows, n_cols = logprobs.shape
        need_grad = ctx.needs_input_grad[0]
        lp, old, adv, keep = (_flat_input(t) for t in (logprobs, old_logprobs, advantages, mask))
        ref = _flat_input(ref_logprobs) if ref_logprobs is not None else lp
        ent = _flat_input(entropy) if entropy is not None else lp
        block = _block_t(n_cols)
        n_tiles = triton.cdiv(n_cols, block)
        device = logprobs.device
        f32 = dict(dtype=torch.float32, device=device)
        # Every (row, tile) program writes all its statistics: no zero-fill needed.
        stats = torch.empty(max(n_rows * n_tiles, 1), N_STATS, **f32)
        dtok = torch.empty(n_rows, n_cols, **f32) if need_grad else stats
        row_count = torch.empty(max(n_rows, 1), **f32)
        loss, metrics, scale = torch.empty((), **f32), torch.empty(len(METRIC_NAMES), **f32), torch.empty(1, **f32)
        if n_rows and n_tiles:
            _grpo_loss_fwd_kernel[(n_rows, n_tiles)](
                lp, old, adv, keep, ref, ent, dtok, stats,
                n_cols, n_tiles, float(clip_low), float(clip_high), min(float(clip_dual), _FLOAT32_MAX), float(kl_coef),
                LOG_RATIO_CLAMP, LOW_VAR_KL_CLAMP,
                KL_TYPE=_KL_CODES[kl_type if ref_logprobs is not None else None], HAS_ENT=entropy is not None,
                NEED_GRAD=need_grad, BLOCK_T=block, N_STATS=N_STATS, num_warps=4,
            )
        if isinstance(denominator, Tensor):
            denom_mode, denom_ptr, denom_value = 2, denominator.reshape(1).to(device), 0.0
        else:
            denom_mode, denom_ptr, denom_value = (0, stats, 0.0) if denominator is None else (1, stats, float(denominator))
        _grpo_loss_finish_kernel[(1,)](
            stats, row_count, loss, metrics, scale, denom_ptr, denom_value, n_rows, n_tiles,
            AGG=_AGG_CODES[agg], DENOM=denom_mode, BLOCK_B=FINISH_BLOCK_B, N_STATS=N_STATS, STAT_COLS=16,
            num_warps=4,
        )
        ctx.mark_non_differentiable(metrics)
        if need_grad:
            ctx.save_for_backward(dtok, row_count, scale)
            ctx.lp_dtype, ctx.per_row, ctx.block = logprobs.dtype, agg == "seq-mean-token-mean", block
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        dtok, row_count, scale = ctx.saved_tensors
        n_rows, n_cols = dtok.shape
        grad = torch.empty(n_rows, n_cols, dtype=ctx.lp_dtype, device=dtok.device)
        if n_rows and n_cols:
            _grpo_loss_bwd_kernel[(n_rows, triton.cdiv(n_cols, ctx.block))](
                dtok, row_count, scale, grad_loss.contiguous(), grad, n_cols, PER_ROW=ctx.per_row, BLOCK_T=ctx.block,
                num_warps=4,
            )
        return grad, None, None, None, None, None, None

