"""Fused GRPO loss kernels (Triton interpreter) against the torch reference in float64.

The reference is the one torch implementation of the objective (`kernels.reference.grpo_loss_reference`,
tests/algo/test_algo_grpo.py checks it against loops over rows).
Rows are tiled in 16-token blocks here, so a row spans several programs and the per-tile partial sums
are exercised; batches of more than 64 rows make the finishing kernel loop over row blocks. Inputs cover every regime: clipped above and below, dual-clipped, the log-ratio clamp,
the k3 clamp, fully masked rows and garbage (even inf/NaN) at masked positions.
"""
from __future__ import annotations

import pytest
import torch

from pebr_mega.kernels import ops as kernels
from pebr_mega.algo.grpo import token_advantages
from pebr_mega.kernels.reference import grpo_loss_reference


INTERPRETED_KERNEL = ("pebr_mega.kernels._grpo_loss_triton", "MAX_BLOCK_T", 16)
pytestmark = pytest.mark.usefixtures("interpreted_kernel")


def make_batch(b: int, t: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    if b > 1:
        lengths[1] = max(int(lengths[1]), t // 2)
    if b > 2:
        lengths[2] = 0  # a fully masked row
    mask = torch.arange(t)[None, :] < lengths[:, None]
    lp = -torch.rand(b, t, generator=g) * 3
    old = lp + torch.randn(b, t, generator=g)  # ratios from ~0.1 to ~10: all clip regimes
    ref = lp + torch.randn(b, t, generator=g) * 1.5  # some k3 values beyond the clamp at 10
    adv_seq = torch.randn(b, generator=g)
    adv_seq[:2] = torch.tensor([1.0, -1.0])[:b]  # both signs present
    adv = token_advantages(adv_seq, mask)
    ent = torch.rand(b, t, generator=g) * 2
    if b > 1:
        old[1, 0] = lp[1, 0] - 30.0  # log-ratio clamped at +20
    garbage = ~mask
    lp, old = lp.masked_fill(garbage, float("-inf")), old.masked_fill(garbage, float("nan"))
    return [x.to(dtype) for x in (lp, old, adv, ref, ent)] + [mask]


def check(b, t, seed, dtype=torch.float32, mask_dtype=torch.bool, with_ref=True, with_ent=True, **kw):
    lp, old, adv, ref, ent, mask = make_batch(b, t, seed, dtype)
    mask = mask.to(mask_dtype)
    ref = ref if with_ref else None
    ent = ent if with_ent else None
    x = lp.clone().requires_grad_()
    loss, metrics = kernels.grpo_loss(x, old, adv, mask, ref, entropy=ent, **kw)
    x64 = lp.double().requires_grad_()
    as64 = [None if v is None else v.double() for v in (old, adv, ref, ent)]
    loss_ref, metrics_ref = grpo_loss_reference(x64, as64[0], as64[1], mask, as64[2], entropy=as64[3], **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=1e-5, atol=1e-6)
    assert metrics.keys() == metrics_ref.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name].double(), metrics_ref[name], rtol=1e-5, atol=1e-6, msg=name)
    g = torch.tensor(0.37)
    (loss * g).backward()
    (loss_ref * g.double()).backward()
    grad_ref = torch.where(mask != 0, x64.grad, 0.0)  # autograd leaves NaN on the garbage positions
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), grad_ref, **tol)
    return metrics


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("kl_type", ["k1", "k2", "low_var_kl"])
def test_fused_loss_matches_algo_reference_for_every_mode(agg, kl_type):
    metrics = check(6, 45, seed=len(agg) + len(kl_type), agg=agg, kl_type=kl_type, kl_coef=0.05)
    # the data really exercise clipping on both sides and the dual clip
    assert 0 < metrics["clip_frac"] < 1 and 0 < metrics["clip_frac_dual"] < 1


def test_asymmetric_bounds_single_row_and_without_ref_or_entropy():
    check(1, 33, seed=3, clip_low=0.1, clip_high=0.5, clip_dual=2.0, with_ref=False, with_ent=False)
    check(3, 20, seed=4, clip_dual=float("inf"), kl_coef=0.0, mask_dtype=torch.float32)


def test_bf16_inputs_int_mask_and_global_denominator():
    check(4, 40, seed=5, dtype=torch.bfloat16, mask_dtype=torch.int64)
    check(4, 40, seed=6, denominator=1000.0)
    check(4, 40, seed=7, agg="seq-mean-token-mean", denominator=10)
    check(4, 40, seed=10, agg="seq-mean-token-sum", denominator=torch.tensor(7.0))


def test_more_rows_than_one_block_of_the_finishing_kernel():
    check(67, 17, seed=11, agg="seq-mean-token-mean")


def test_all_masked_batch_gives_zero_loss_and_zero_gradient():
    lp, old, adv, ref, _, mask = make_batch(3, 17, seed=8)
    x = lp.clone().requires_grad_()
    loss, metrics = kernels.grpo_loss(x, old, adv, torch.zeros_like(mask), ref)
    loss.backward()
    assert loss.item() == 0.0 and metrics["clip_frac"].item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_one_torch_reference_cpu_fallback_and_bad_inputs_raise(monkeypatch):
    lp, old, adv, ref, ent, mask = make_batch(5, 12, seed=9, dtype=torch.float64)
    monkeypatch.delenv("TRITON_INTERPRET")
    cpu_loss, _ = kernels.grpo_loss(lp.float(), old.float(), adv.float(), mask, ref.float())
    torch.testing.assert_close(cpu_loss.double(), grpo_loss_reference(lp, old, adv, mask, ref)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="advantages shape"):
        kernels.grpo_loss(lp, old, adv[:, :3], mask)
    with pytest.raises(ValueError, match="agg 'mean'"):
        kernels.grpo_loss(lp, old, adv, mask, agg="mean")
