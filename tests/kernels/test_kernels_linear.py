"""Chunked log-probs from hidden states (Triton interpreter) against float64 autograd on the full logits.

Chunks of 16 rows over N = 40 (a partial last chunk) and vocabulary blocks of 128 over V = 300.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pebr_mega.kernels import ops as kernels
from pebr_mega.kernels.reference import linear_logprobs_reference, logprobs_reference


INTERPRETED_KERNEL = ("pebr_mega.kernels._logprobs_triton", "MAX_BLOCK_V", 128)
pytestmark = pytest.mark.usefixtures("interpreted_kernel")


def make_inputs(n: int, h: int, v: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.4
    ids = torch.randint(0, v, (n,), generator=g)
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, ids, a, b


def test_linear_logprobs_values_and_both_gradients_match_float64_reference():
    hidden, weight, ids, a, b = make_inputs(40, 24, 300, seed=0)
    hk, wk = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = kernels.linear_logprobs(hk, wk, ids, 0.8, return_entropy=True, chunk_rows=16)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp_ref, ent_ref = linear_logprobs_reference(hr, wr, ids, 0.8, return_entropy=True)
    torch.testing.assert_close(logp.double(), logp_ref.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), rtol=1e-5, atol=2e-5)
    ((a * logp.double()).sum() + (b * ent.double()).sum()).backward()
    ((a * logp_ref).sum() + (b * ent_ref).sum()).backward()
    torch.testing.assert_close(hk.grad.double(), hr.grad, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(wk.grad.double(), wr.grad, rtol=1e-4, atol=2e-5)


def test_bf16_leading_dims_and_frozen_weight():
    hidden, weight, ids, a, _ = make_inputs(12, 16, 200, seed=1)
    hidden, weight = hidden.bfloat16().view(3, 4, 16), weight.bfloat16()
    hk = hidden.clone().requires_grad_()
    logp, ent = kernels.linear_logprobs(hk, weight, ids.view(3, 4), 1.2, chunk_rows=5)
    assert ent is None and logp.shape == (3, 4) and logp.dtype == torch.float32
    # bf16 logits as the kernel path forms them, then the float64 reference on them (a matmul blocked
    # differently may round a logit to the neighbouring bf16 value, hence the tolerance).
    logp_ref, _ = logprobs_reference((hidden @ weight.T).double(), ids.view(3, 4), 1.2)
    torch.testing.assert_close(logp.double(), logp_ref, rtol=0, atol=2e-2)
    (a.view(3, 4) * logp.double()).sum().backward()
    hr = hidden.double().requires_grad_()
    ref2, _ = linear_logprobs_reference(hr, weight.double(), ids.view(3, 4), 1.2)
    (a.view(3, 4) * ref2).sum().backward()
    assert hk.grad.dtype == torch.bfloat16
    torch.testing.assert_close(hk.grad.double(), hr.grad, rtol=3e-2, atol=3e-2)


def test_bad_weight_shape_is_named():
    hidden, weight, ids, _, _ = make_inputs(4, 8, 30, seed=2)
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = hidden.shape\[-1\] = 8"):
        kernels.linear_logprobs(hidden, weight[:, :5], ids)


def _tp_worker(rank: int, world: int, init_file: str) -> None:
    import importlib

    from pebr_mega.kernels import ops as k

    importlib.import_module("pebr_mega.kernels._logprobs_triton").MAX_BLOCK_V = 64
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    hidden, weight, ids, a, b = make_inputs(10, 12, 2 * 90, seed=3)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp_ref, ent_ref = linear_logprobs_reference(hr, wr, ids, 0.9, return_entropy=True)
    ((a * logp_ref).sum() + (b * ent_ref).sum()).backward()
    rows = slice(rank * 90, (rank + 1) * 90)
    for interpret in ("1", "0"):  # the Triton path, then the torch fallback
        os.environ["TRITON_INTERPRET"] = interpret
        hk, wk = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
        logp, ent = k.linear_logprobs(hk, wk, ids, 0.9, True, dist.group.WORLD, chunk_rows=4)
        torch.testing.assert_close(logp.double(), logp_ref.detach(), rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ent.double(), ent_ref.detach(), rtol=1e-5, atol=2e-5)
        ((a * logp.double()).sum() + (b * ent.double()).sum()).backward()
        torch.testing.assert_close(hk.grad.double(), hr.grad, rtol=1e-4, atol=2e-5)  # full gradient
        torch.testing.assert_close(wk.grad.double(), wr.grad[rows], rtol=1e-4, atol=2e-5)
    dist.destroy_process_group()


def test_vocab_parallel_linear_logprobs_over_two_gloo_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_tp_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
