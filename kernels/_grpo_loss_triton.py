"""The fused GRPO loss: one Triton pass over the ``[B, T]`` token tensors, forward and gradient together.

The formulas are those of `pebr_mega.algo.grpo` (documented there). Per token, with lr = log pi - log pi_old:

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
per-row weight w_b fixed by the mode and the counts (`algo.grpo.row_weights`). So one pass can emit, per
(row, tile of BLOCK_T tokens), the masked sums the loss and metrics need, and the per-token derivative
D_bt = mask_bt (dL/d log pi + kl_coef dKL/d log pi), without knowing w yet. The counts then give w (a few
``[B]``-sized torch ops), and backward is d loss / d log pi_bt = grad * w_b * D_bt, one broadcast multiply.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import LOG_RATIO_CLAMP, LOW_VAR_KL_CLAMP

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


def _row_weights(count: Tensor, agg: str, denominator) -> Tensor:
    # w_b of `algo.grpo.row_weights`, from the per-row token counts.
    if denominator is not None:
        n = torch.as_tensor(denominator, dtype=torch.float32, device=count.device)
    elif agg == "token-mean":
        n = count.sum().clamp(min=1)
    else:
        n = (count > 0).sum().float().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return 1.0 / (n * count.clamp(min=1))
    return (1.0 / n).expand(count.shape)


def _flat_input(t: Tensor) -> Tensor:
    t = t.contiguous()
    return t.view(torch.uint8) if t.dtype == torch.bool else t


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
        block = max(16, min(MAX_BLOCK_T, triton.next_power_of_2(max(n_cols, 1))))
        n_tiles = triton.cdiv(n_cols, block)
        device = logprobs.device
        stats = torch.zeros(n_rows, n_tiles, N_STATS, dtype=torch.float32, device=device)
        dtok = torch.empty(n_rows, n_cols, dtype=torch.float32, device=device) if need_grad else stats
        if n_rows and n_tiles:
            _grpo_loss_fwd_kernel[(n_rows, n_tiles)](
                lp, old, adv, keep, ref, ent, dtok, stats,
                n_cols, n_tiles, float(clip_low), float(clip_high), min(float(clip_dual), _FLOAT32_MAX), float(kl_coef),
                LOG_RATIO_CLAMP, LOW_VAR_KL_CLAMP,
                KL_TYPE=_KL_CODES[kl_type if ref_logprobs is not None else None], HAS_ENT=entropy is not None,
                NEED_GRAD=need_grad, BLOCK_T=block, N_STATS=N_STATS, num_warps=4,
            )
        per_row = stats.sum(1)  # [B, N_STATS]
        weights = _row_weights(per_row[:, 1], agg, denominator)
        weighted = weights @ per_row[:, :4]  # loss, (count), pg, kl aggregated with w_b
        totals = per_row.sum(0)
        means = totals[4:] / totals[1].clamp(min=1)  # clip, dual, approx_kl, -log pi, entropy
        metrics = torch.cat([weighted[2:4], means])
        ctx.mark_non_differentiable(metrics)
        if need_grad:
            ctx.save_for_backward(dtok, weights)
            ctx.lp_dtype = logprobs.dtype
        return weighted[0], metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        dtok, weights = ctx.saved_tensors
        grad = dtok * (grad_loss * weights).unsqueeze(1)
        return grad.to(ctx.lp_dtype), None, None, None, None, None, None
