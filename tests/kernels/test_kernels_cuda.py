"""The compiled Triton kernels on a CUDA device against the float64 torch references (skipped without CUDA).

The CPU tests run the same kernels in Triton's interpreter; these run them compiled, at sizes that cross
many vocabulary chunks (including a partial last one), in bf16 and fp32, forward and backward, on random
inputs. Marked ``gpu``: collected everywhere, run only where ``torch.cuda.is_available()``.
"""
from __future__ import annotations

import os

import pytest
import torch

from kernel_checks import check_logprobs_against_reference
from pebr_mega.kernels import ops as kernels
from pebr_mega.kernels.reference import AGG_MODES, KL_TYPES, grpo_loss_reference, logprobs_reference

pytestmark = pytest.mark.gpu

CUDA = "cuda"


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Make sure the compiler, not the interpreter, runs the kernels here."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: these tests are for the compiled kernels")
    yield


def random_logits(n: int, v: int, dtype: torch.dtype, seed: int, pad: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * 4.0
    if pad:
        x[:, v - pad:] = float("-inf")  # vocabulary padding, as Megatron pads the embedding
    return x.to(dtype).to(CUDA)


@pytest.mark.parametrize("n, v, temperature, dtype, pad", [
    (64, 151_936, 1.0, torch.bfloat16, 0),       # Qwen2.5's vocabulary, many chunks
    (33, 50_000, 0.7, torch.float32, 112),       # partial last chunk, -inf padding
    (7, 129, 1.3, torch.bfloat16, 0),            # one chunk and a remainder of one
])
def test_compiled_logprobs_match_float64(n, v, temperature, dtype, pad):
    x = random_logits(n, v, dtype, seed=n + v, pad=pad)
    ids = torch.randint(0, v - pad, (n,), generator=torch.Generator().manual_seed(v)).to(CUDA)
    check_logprobs_against_reference(x, ids, temperature, seed=n)


def test_compiled_linear_logprobs_match_float64():
    g = torch.Generator().manual_seed(11)
    n, h, v = 96, 256, 30_011
    hidden = (torch.randn(n, h, generator=g) * 0.5).to(torch.bfloat16).to(CUDA)
    weight = (torch.randn(v, h, generator=g) * 0.05).to(torch.bfloat16).to(CUDA)
    ids = torch.randint(0, v, (n,), generator=g).to(CUDA)
    a = torch.randn(n, generator=g, dtype=torch.float64).to(CUDA)
    hk, wk = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = kernels.linear_logprobs(hk, wk, ids, 0.9, return_entropy=True, chunk_rows=40)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp_ref, ent_ref = logprobs_reference(hr @ wr.T, ids, 0.9, return_entropy=True)
    # bf16 matmul inputs, fp32 accumulation: compare at the precision of the product.
    torch.testing.assert_close(logp.double(), logp_ref.detach(), rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(ent.double(), ent_ref.detach(), rtol=2e-3, atol=2e-2)
    (a * logp.double()).sum().backward()
    (a * logp_ref).sum().backward()
    torch.testing.assert_close(hk.grad.double(), hr.grad, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(wk.grad.double(), wr.grad, rtol=3e-2, atol=3e-3)


@pytest.mark.parametrize("kl_type", sorted(KL_TYPES))
@pytest.mark.parametrize("agg", sorted(AGG_MODES))
def test_compiled_grpo_loss_matches_float64(kl_type, agg):
    g = torch.Generator().manual_seed(len(kl_type) * 31 + len(agg))
    b, t = 24, 700
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    lp = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4  # ratios both sides of the clips
    ref = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).contiguous()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).double()
    mask[3] = 0  # a response with no tokens
    entropy = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    tensors = [x.to(CUDA) for x in (lp, old, adv, mask, ref, entropy)]
    lp32 = tensors[0].float().requires_grad_()
    loss, metrics = kernels.grpo_loss(lp32, *[x.float() for x in tensors[1:5]], kl_type=kl_type, agg=agg,
                                      entropy=tensors[5].float())
    lp64 = tensors[0].clone().requires_grad_()
    loss_ref, metrics_ref = grpo_loss_reference(lp64, *tensors[1:5], kl_type=kl_type, agg=agg, entropy=tensors[5])
    torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=1e-5, atol=1e-6)
    for name, want in metrics_ref.items():
        torch.testing.assert_close(metrics[name].double(), want.double(), rtol=1e-4, atol=1e-5, msg=name)
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(lp32.grad.double(), lp64.grad, rtol=1e-4, atol=1e-7)
