"""Log-probs straight from hidden states and the lm_head weight, chunked so the full logits never exist.

For each chunk of rows: logits_c = hidden_c @ weight.T (a torch matmul, [rows, V_local] in the hidden
dtype), then the fused log-prob kernel of `_logprobs_triton` reduces them to (log p_y, lse, H) and the
chunk is freed. Backward recomputes logits_c, lets the backward kernel overwrite it with dL/dlogits_c
(in place: no second buffer) and applies the two matmuls of a linear layer:
    dL/dhidden_c = dlogits_c @ weight,    dL/dweight += dlogits_c.T @ hidden_c.
Peak extra memory is one chunk of logits plus the gradients themselves. The cost is a third matmul
(the recompute): 8 N H V FLOPs for forward + backward instead of 6 N H V.

dL/dweight accumulates in the weight's dtype, one rounding per chunk (an fp32 accumulator for a 7B lm_head
would itself be 2.2 GB). With ``tp_group`` (weight = this rank's vocabulary slice, hidden replicated) the
hidden gradient is all-reduced over the group at the end.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import _logprobs_triton as fused  # module attribute lookups: stays valid across importlib.reload

CHUNK_ELEMENTS = 2**28  # logits per chunk: 512 MiB in bf16


def default_chunk_rows(n_vocab_local: int) -> int:
    """Rows per chunk so that one chunk of logits holds about CHUNK_ELEMENTS values."""
    return max(1, CHUNK_ELEMENTS // n_vocab_local)


class FusedLinearLogprobs(torch.autograd.Function):
    """(hidden [N, H], weight [V_local, H], targets [N]) -> (log p_y [N] float32, H [N] float32 or None)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, tp_group, chunk_rows):
        n_rows = hidden.shape[0]
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for start in range(0, n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n_rows))
            logits = hidden[rows] @ weight.T
            logp_c, lse_c, ent_c = fused.forward_stats(logits, targets[rows], temperature, with_entropy, tp_group)
            logp[rows], lse[rows] = logp_c, lse_c
            if with_entropy:
                ent[rows] = ent_c
            del logits
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.temperature, ctx.tp_group, ctx.chunk_rows = temperature, tp_group, chunk_rows
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp is None and grad_ent is None) or not (need_hidden or need_weight):
            return (None,) * 7
        d_hidden = torch.empty_like(hidden) if need_hidden else None
        d_weight = torch.zeros_like(weight) if need_weight else None
        n_rows = hidden.shape[0]
        for start in range(0, n_rows, ctx.chunk_rows):
            rows = slice(start, min(start + ctx.chunk_rows, n_rows))
            logits = hidden[rows] @ weight.T
            fused.backward_dlogits(
                logits, targets[rows], ctx.temperature, lse[rows], None if ent is None else ent[rows],
                None if grad_logp is None else grad_logp[rows], None if grad_ent is None else grad_ent[rows],
                out=logits, tp_group=ctx.tp_group,
            )
            if need_hidden:
                torch.mm(logits, weight, out=d_hidden[rows])
            if need_weight:
                d_weight.addmm_(logits.T, hidden[rows])
            del logits
        if need_hidden and ctx.tp_group is not None:
            dist.all_reduce(d_hidden, group=ctx.tp_group)
        return d_hidden, d_weight, None, None, None, None, None
