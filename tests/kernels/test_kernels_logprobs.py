"""Fused log-prob/entropy kernel in Triton's interpreter against the float64 torch reference.

The kernels run on CPU under TRITON_INTERPRET=1, set by a module fixture before the kernel module is first
imported (triton.jit picks interpreter or compiler when it decorates) and restored afterwards, so that
other test modules keep the fast torch path. The vocabulary chunk is lowered to 128 so that every row
crosses several chunks, including a partial last one.
"""
from __future__ import annotations

import importlib
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pebr_mega.kernels import ops as kernels
from kernel_checks import check_logprobs_against_reference
from pebr_mega.kernels.reference import logprobs_reference

BLOCK_V = 128


INTERPRETED_KERNEL = ("pebr_mega.kernels._logprobs_triton", "MAX_BLOCK_V", BLOCK_V)
pytestmark = pytest.mark.usefixtures("interpreted_kernel")


def make_logits(n: int, v: int, seed: int, scale: float = 3.0, pad: int = 0, extreme: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    if pad:
        x[:, v - pad:] = float("-inf")  # vocabulary padding
    if extreme and n >= 3:
        x[0, 3] = 1e4  # one dominant logit: p ~ one-hot
        x[1, :] = -1e4
        x[1, v // 2] = 1e4
        x[2, : 2 * BLOCK_V] = float("-inf")  # the first chunks are all -inf
    return x


def random_targets(n: int, high: int, seed: int) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "n, v, temperature, dtype, pad, extreme",
    [
        (1, 37, 1.0, torch.float32, 0, False),  # a single row, one partial chunk
        (12, 1000, 0.7, torch.float32, 24, True),  # -inf padding, +-1e4 logits, all -inf leading chunks
        (8, 300, 1.3, torch.bfloat16, 0, False),
    ],
)
def test_logprobs_and_entropy_match_reference_with_gradients(n, v, temperature, dtype, pad, extreme):
    x = make_logits(n, v, seed=n + v, pad=pad, extreme=extreme).to(dtype)
    ids = random_targets(n, v - pad, seed=v)
    check_logprobs_against_reference(x, ids, temperature, seed=n)


def test_gradient_when_only_one_output_is_used():
    x = make_logits(6, 260, seed=3, pad=5)
    ids = random_targets(6, 255, seed=4)
    check_logprobs_against_reference(x, ids, 0.9, seed=5, use_logp=False, use_ent=True)
    check_logprobs_against_reference(x, ids, 0.9, seed=6, use_logp=True, use_ent=False)


def test_leading_dims_no_entropy_and_inplace_backward_give_the_same_gradient():
    x = make_logits(2 * 5, 200, seed=7).view(2, 5, 200)
    ids = random_targets(10, 200, seed=8).view(2, 5)
    weights = torch.randn(2, 5, generator=torch.Generator().manual_seed(9))
    a = x.clone().requires_grad_()
    logp, ent = kernels.logprobs(a, ids, 1.1)
    assert ent is None and logp.shape == (2, 5)
    (logp * weights).sum().backward()
    # In place: the gradient overwrites the logits' own storage (a non-leaf, as an lm_head output is).
    leaf = x.clone().requires_grad_()
    fresh = leaf * 1.0
    logp2, _ = kernels.logprobs(fresh, ids, 1.1, inplace_backward=True)
    torch.testing.assert_close(logp2, logp, rtol=0, atol=0)
    (logp2 * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, a.grad, rtol=0, atol=0)
    assert torch.equal(fresh.detach(), a.grad)  # the logits' storage now holds the gradient


def test_bad_inputs_raise_clear_errors():
    x = make_logits(3, 50, seed=1)
    with pytest.raises(ValueError, match=r"token_ids\[1\] = 50 is outside the vocabulary \[0, 50\)"):
        kernels.logprobs(x, torch.tensor([0, 50, 2]))
    with pytest.raises(ValueError, match="token_ids shape"):
        kernels.logprobs(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="temperature"):
        kernels.logprobs(x, torch.tensor([0, 1, 2]), temperature=0.0)


def test_cpu_without_interpreter_takes_the_torch_reference(monkeypatch):
    x = make_logits(4, 64, seed=2)
    ids = random_targets(4, 64, seed=2)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not kernels.use_triton(x) and not kernels.use_triton(x.double())
    got = kernels.logprobs(x, ids, 0.8, return_entropy=True)
    want = logprobs_reference(x, ids, 0.8, return_entropy=True)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ------------------------------------------------------------------------------------- vocab-parallel


def _tp_worker(rank: int, world: int, init_file: str) -> None:
    from pebr_mega.kernels import ops as k

    lt = importlib.import_module("pebr_mega.kernels._logprobs_triton")
    lt.MAX_BLOCK_V = 64
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    n, v = 6, 2 * 150
    x = make_logits(n, v, seed=11, pad=20)
    x[0, 150:] = float("-inf")  # row 0: rank 1's whole slice is -inf
    x[1, 10] = 1e4
    ids = random_targets(n, v - 20, seed=12)
    ids[0] = 149
    g = torch.Generator().manual_seed(13)
    a, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    xr = x.double().requires_grad_()
    logp_ref, ent_ref = logprobs_reference(xr, ids, 0.8, return_entropy=True)
    ((a * logp_ref).sum() + (b * ent_ref).sum()).backward()
    lo, hi = rank * 150, (rank + 1) * 150
    for interpret in ("1", "0"):  # the Triton kernels, then the torch fallback
        os.environ["TRITON_INTERPRET"] = interpret
        local = x[:, lo:hi].clone().requires_grad_()
        logp, ent = k.logprobs(local, ids, 0.8, return_entropy=True, tp_group=dist.group.WORLD)
        torch.testing.assert_close(logp.double(), logp_ref.detach(), rtol=0, atol=2e-3 if interpret == "1" else 1e-3)
        torch.testing.assert_close(ent.double(), ent_ref.detach(), rtol=1e-5, atol=2e-5)
        ((a * logp.double()).sum() + (b * ent.double()).sum()).backward()
        torch.testing.assert_close(local.grad.double(), xr.grad[:, lo:hi], rtol=1e-5, atol=2e-6)
    dist.destroy_process_group()


def test_vocab_parallel_over_two_gloo_ranks_matches_unsharded_reference():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_tp_worker, args=(2, os.path.join(tmp, "init")), nprocs=2, join=True)
