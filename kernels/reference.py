"""Plain torch references for the fused kernels: the test oracle and the CPU path without the interpreter.

Written independently of the Triton code, in the most direct form (full `log_softmax`, autograd for the
gradients), so they materialise `[N, V]` intermediates: fine on CPU for tests and the tiny demo, never
used on CUDA. They compute in float64 when given float64 and in float32 otherwise.

Vocab-parallel (`tp_group`): every rank holds an equal, contiguous slice of the vocabulary in rank order
(Megatron's layout). The references gather the full vocabulary, keep the autograd edge to this rank's
slice, and compute the unsharded answer, so each rank gets d(loss)/d(its slice) for a loss that every
rank computes identically (Megatron's convention for vocab-parallel cross-entropy).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

KL_TYPES = ("k1", "k2", "low_var_kl")
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
# exp() of a log-ratio beyond +-20 overflows nothing in float32 but gives ratios of e^20 ~ 5e8 that make
# the gradient useless; EasyR1 clamps the log-ratio here (and the clamp also keeps autograd free of
# inf * 0 = NaN in the clipped branches). The k3 estimate is then clamped to +-10 as in EasyR1.
LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0
METRIC_NAMES = ("pg_loss", "kl_loss", "clip_frac", "clip_frac_dual", "approx_kl", "neg_logprob", "entropy")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_vocab(local: Tensor, group) -> Tensor:
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    parts[rank] = local  # the only slice with an autograd edge: each rank differentiates its own
    return torch.cat(parts, dim=-1)


def logprobs_reference(
    logits: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    tp_group=None,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / T)[token] per row, and the entropy -sum p log p of softmax(logits / T).

    ``logits`` is ``[..., V]`` (``[..., V / world]`` per rank with ``tp_group``); ``token_ids`` is ``[...]``
    with ids into the full vocabulary. -inf logits (padding) get probability 0 and add nothing to the
    entropy.
    """
    full = _gather_vocab(logits, tp_group) if tp_group is not None else logits
    logp_all = torch.log_softmax(full.to(compute_dtype(full.dtype)) / temperature, dim=-1)
    logp = logp_all.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp, None
    p = logp_all.exp()
    # p log p -> 0 as p -> 0; fill before multiplying so that autograd never sees 0 * -inf.
    entropy = -(p * logp_all.masked_fill(p == 0, 0.0)).sum(-1)
    return logp, entropy


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient in backward over the tensor-parallel group."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def linear_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    token_ids: Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    tp_group=None,
) -> tuple[Tensor, Tensor | None]:
    """``logprobs_reference(hidden @ weight.T, ...)``; with ``tp_group`` the weight is this rank's vocab
    slice and the hidden-state gradient is summed over the group (the full gradient on every rank)."""
    if tp_group is not None:
        hidden = _AllReduceGrad.apply(hidden, tp_group)
    dtype = compute_dtype(hidden.dtype)
    logits = hidden.to(dtype) @ weight.to(dtype).T if dtype == torch.float64 else hidden @ weight.T
    return logprobs_reference(logits, token_ids, temperature, return_entropy, tp_group)


def check_loss_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                      ref_logprobs: Tensor | None, entropy: Tensor | None, kl_type: str, agg: str) -> None:
    """Raise ValueError naming the argument when a GRPO loss input has the wrong shape or an unknown mode."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    named = {"old_logprobs": old_logprobs, "advantages": advantages, "mask": mask,
             "ref_logprobs": ref_logprobs, "entropy": entropy}
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type {kl_type!r} is not one of {list(KL_TYPES)}")
    if agg not in AGG_MODES:
        raise ValueError(f"agg {agg!r} is not one of {list(AGG_MODES)}")


def grpo_loss_reference(
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
    entropy: Tensor | None = None,
    denominator: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss of `pebr_mega.algo.grpo.grpo_loss` (see its docstring for every formula), in torch.

    Kept here because kernels sit below algo in the dependency order; the tests check that the two agree.
    """
    dtype = compute_dtype(logprobs.dtype)
    lp, old, adv = logprobs.to(dtype), old_logprobs.to(dtype), advantages.to(dtype)
    keep = mask != 0
    log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    ppo = torch.maximum(unclipped, clipped)
    pg = torch.where(adv < 0, torch.minimum(ppo, -adv * clip_dual), ppo)
    kl = None
    if ref_logprobs is not None:
        ref = ref_logprobs.to(dtype)
        if kl_type == "k1":
            kl = lp - ref
        elif kl_type == "k2":
            kl = 0.5 * (lp - ref).square()
        elif kl_type == "low_var_kl":
            delta = (ref - lp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            kl = (delta.exp() - delta - 1).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)
        else:
            raise ValueError(f"kl_type {kl_type!r} is not one of ['k1', 'k2', 'low_var_kl']")
    weights = _row_weights(keep, agg, denominator, dtype)

    def agg_of(x: Tensor) -> Tensor:
        return (torch.where(keep, x, x.new_zeros(())).sum(-1) * weights).sum()

    def mean_of(x: Tensor) -> Tensor:
        return torch.where(keep, x.to(dtype), x.new_zeros((), dtype=dtype)).sum() / keep.sum().clamp(min=1)

    loss = agg_of(pg if kl is None else pg + kl_coef * kl)
    metrics = {"pg_loss": agg_of(pg)}
    if kl is not None:
        metrics["kl_loss"] = agg_of(kl)
    metrics["clip_frac"] = mean_of(clipped > unclipped)
    metrics["clip_frac_dual"] = mean_of((adv < 0) & (ppo > -adv * clip_dual))
    metrics["approx_kl"] = mean_of(-log_ratio)
    metrics["neg_logprob"] = mean_of(-lp)
    if entropy is not None:
        metrics["entropy"] = mean_of(entropy)
    return loss, {k: v.detach() for k, v in metrics.items()}


def _row_weights(keep: Tensor, agg: str, denominator, dtype: torch.dtype) -> Tensor:
    per_row = keep.sum(-1).to(dtype)
    if denominator is not None:
        count = torch.as_tensor(denominator, dtype=dtype, device=keep.device)
    elif agg == "token-mean":
        count = per_row.sum().clamp(min=1)
    else:
        count = (per_row > 0).sum().to(dtype).clamp(min=1)
    if agg in ("token-mean", "seq-mean-token-sum"):
        return (1 / count).expand(per_row.shape)
    if agg == "seq-mean-token-mean":
        return 1 / (count * per_row.clamp(min=1))
    raise ValueError(f"agg {agg!r} is not one of ['token-mean', 'seq-mean-token-sum', 'seq-mean-token-mean']")
