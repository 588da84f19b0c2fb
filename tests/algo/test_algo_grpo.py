"""GRPO math (pebr_mega.algo.grpo and the objective in pebr_mega.kernels.reference) against independent element-by-element references and Monte Carlo."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from pebr_mega.algo.grpo import AlgoConfig, group_advantages, token_advantages
from pebr_mega.kernels.reference import (aggregate, grpo_loss_reference, kl_penalty, masked_mean,
                                         policy_loss_per_token)
from pebr_mega.config import ConfigError, load_config


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ advantages


def test_group_advantages_match_per_group_statistics_with_unbiased_std():
    g = _gen(0)
    ids = [7, 3, 7, 9, 3, 7, 3, 3, 5, 9]  # interleaved groups of sizes 3, 4, 2 and a singleton (5)
    scores = torch.rand(len(ids), generator=g, dtype=torch.float64)
    got = group_advantages(scores, group_ids=ids, eps=1e-6)
    got_dr = group_advantages(scores, group_ids=ids, norm_by_std=False)
    for i, gid in enumerate(ids):
        members = [float(scores[j]) for j, o in enumerate(ids) if o == gid]
        if len(members) == 1:  # verl's convention: mean 0, std 1
            mean, std = 0.0, 1.0
        else:
            mean, std = statistics.fmean(members), statistics.stdev(members)
        assert got[i].item() == pytest.approx((float(scores[i]) - mean) / (std + 1e-6), rel=1e-12, abs=1e-12)
        assert got_dr[i].item() == pytest.approx(float(scores[i]) - mean, rel=1e-12, abs=1e-12)


def test_group_advantages_contiguous_n_equals_explicit_ids_and_edge_groups_are_finite():
    scores = torch.rand(24, generator=_gen(1))
    by_n = group_advantages(scores, n=8)
    by_ids = group_advantages(scores, group_ids=torch.arange(24) // 8)
    torch.testing.assert_close(by_n, by_ids)
    # All-equal scores (std 0) give 0, a single response gives score / (1 + eps): never NaN.
    flat = group_advantages(torch.full((8,), 0.5), n=8)
    assert torch.equal(flat, torch.zeros(8))
    single = group_advantages(torch.tensor([0.25, 1.0]), n=1)
    torch.testing.assert_close(single, torch.tensor([0.25, 1.0]) / (1 + 1e-6))
    # Group advantages sum to zero and (with std normalisation) have unbiased std ~1 per group.
    grouped = by_n.view(3, 8)
    torch.testing.assert_close(grouped.sum(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(grouped.std(1), torch.ones(3), atol=1e-4, rtol=0)


def test_group_advantages_rejects_bad_grouping():
    with pytest.raises(ValueError, match="groups of n=3"):
        group_advantages(torch.rand(8), n=3)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(torch.rand(8))
    with pytest.raises(ValueError, match="group_ids shape"):
        group_advantages(torch.rand(8), group_ids=[0, 1])


def test_token_advantages_broadcast_under_mask():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    got = token_advantages(torch.tensor([2.0, -1.0]), mask)
    assert torch.equal(got, torch.tensor([[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]]))


# ----------------------------------------------------------------------------------------------- KL


def test_kl_estimators_are_unbiased_or_match_their_definition_by_monte_carlo():
    # Sample tokens from pi over a small vocabulary: E_pi[k1] = E_pi[k3] = KL(pi || ref) exactly, and
    # E_pi[k2] is the second-order approximation. The exact KL comes from the full distributions.
    g = _gen(2)
    pi = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    ref = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64) * 0.5, 0)
    exact = float((pi * (pi.log() - ref.log())).sum())
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    lp, ref_lp = pi.log()[tokens], ref.log()[tokens]
    k1 = kl_penalty(lp, ref_lp, "k1").mean().item()
    k3 = kl_penalty(lp, ref_lp, "low_var_kl").mean().item()
    k2 = kl_penalty(lp, ref_lp, "k2").mean().item()
    expected_k2 = float((pi * 0.5 * (pi.log() - ref.log()) ** 2).sum())
    assert k1 == pytest.approx(exact, abs=0.01)
    assert k3 == pytest.approx(exact, abs=0.01)
    assert k2 == pytest.approx(expected_k2, abs=0.01)
    # k3 has lower variance than k1 and is never negative.
    assert kl_penalty(lp, ref_lp, "low_var_kl").var() < kl_penalty(lp, ref_lp, "k1").var()
    assert (kl_penalty(lp, ref_lp, "low_var_kl") >= 0).all()


def test_low_var_kl_clamps_and_stays_finite_for_extreme_log_ratios():
    lp = torch.tensor([0.0, 0.0, 0.0, -50.0, 0.0], dtype=torch.float64)
    ref = torch.tensor([0.5, -2.0, 30.0, 0.0, -1e4], dtype=torch.float64)
    got = kl_penalty(lp, ref, "low_var_kl")
    for i in range(2):  # inside the clamps: the textbook formula
        d = float(ref[i] - lp[i])
        assert got[i].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12)
    assert got[2:].tolist() == [10.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="kl_type 'k9'"):
        kl_penalty(lp, ref, "k9")


# ---------------------------------------------------------------------------------------- policy loss


def _ppo_by_cases(lp: float, old: float, a: float, lo: float, hi: float, c: float) -> float:
    """Textbook case analysis of asymmetric PPO-clip + dual-clip (not the max/min formulation)."""
    r = math.exp(max(-20.0, min(20.0, lp - old)))
    if a >= 0:
        return -a * min(r, 1 + hi)  # pessimistic: the gain is capped once r passes 1 + hi
    # a < 0: the loss |a| r is floored at |a| (1 - lo) and capped at |a| c by the dual clip
    return -a * min(max(r, 1 - lo), c)


def test_policy_loss_matches_case_analysis_and_flags_clipping():
    g = _gen(3)
    lp = torch.randn(400, generator=g, dtype=torch.float64) * 0.8
    old = torch.randn(400, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(400, generator=g, dtype=torch.float64)
    loss, clipped, dual = policy_loss_per_token(lp, old, adv, 0.2, 0.3, 3.0)
    for i in range(400):
        expect = _ppo_by_cases(lp[i].item(), old[i].item(), adv[i].item(), 0.2, 0.3, 3.0)
        assert loss[i].item() == pytest.approx(expect, rel=1e-12, abs=1e-12)
        r = math.exp(lp[i].item() - old[i].item())
        a = adv[i].item()
        assert bool(clipped[i]) == ((a > 0 and r > 1.3) or (a < 0 and r < 0.8))
        assert bool(dual[i]) == (a < 0 and r > 3.0)
    assert clipped.any() and dual.any() and (~clipped & ~dual).any()  # every regime was exercised


def test_policy_loss_gradient_is_zero_exactly_where_clipped():
    g = _gen(4)
    lp = (torch.randn(300, generator=g, dtype=torch.float64) * 0.8).requires_grad_()
    old = torch.randn(300, generator=g, dtype=torch.float64) * 0.8
    adv = torch.randn(300, generator=g, dtype=torch.float64)
    loss, clipped, dual = policy_loss_per_token(lp, old, adv)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    ratio = torch.exp(lp.detach() - old)
    expect = torch.where(clipped | dual, torch.zeros_like(ratio), -adv * ratio)  # d(-A r)/d lp = -A r
    torch.testing.assert_close(grad, expect, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------- aggregation


def _random_batch(seed: int, b: int = 5, t: int = 9, dtype=torch.float64):
    g = _gen(seed)
    lengths = torch.tensor([t, 3, 0, 1, 6][:b])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)  # row 2 fully masked
    values = torch.randn(b, t, generator=g, dtype=dtype)
    return values, mask


def test_aggregation_modes_match_loops_over_rows():
    values, mask = _random_batch(5)
    rows = [[values[b, t].item() for t in range(values.shape[1]) if mask[b, t]] for b in range(values.shape[0])]
    nonempty = [r for r in rows if r]
    token_mean = sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    seq_sum = sum(sum(r) for r in nonempty) / len(nonempty)
    seq_mean = sum(statistics.fmean(r) for r in nonempty) / len(nonempty)
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(token_mean, rel=1e-12)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx(seq_sum, rel=1e-12)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx(seq_mean, rel=1e-12)
    # An explicit (global) denominator replaces the local count.
    assert aggregate(values, mask, "token-mean", 100).item() == pytest.approx(token_mean * 19 / 100, rel=1e-12)
    assert aggregate(values, mask, "seq-mean-token-sum", 8).item() == pytest.approx(seq_sum * 4 / 8, rel=1e-12)
    # A fully masked batch gives 0, and NaN at masked positions never leaks.
    poisoned = values.masked_fill(mask == 0, float("nan"))
    assert aggregate(poisoned, torch.zeros_like(mask), "seq-mean-token-mean").item() == 0.0
    assert aggregate(poisoned, mask, "token-mean").item() == pytest.approx(token_mean, rel=1e-12)
    assert masked_mean(poisoned, mask).item() == pytest.approx(token_mean, rel=1e-12)
    with pytest.raises(ValueError, match="agg 'sum'"):
        aggregate(values, mask, "sum")


def test_grpo_loss_adds_kl_to_the_policy_loss_and_reports_metrics():
    g = _gen(6)
    _, mask = _random_batch(6)
    shape = mask.shape
    lp = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5 - 1
    old = lp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    ref = lp + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    adv = token_advantages(torch.randn(shape[0], generator=g, dtype=torch.float64), mask)
    ent = torch.rand(shape, generator=g, dtype=torch.float64) * 3
    for agg in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        loss, m = grpo_loss_reference(lp, old, adv, mask, ref, kl_coef=0.05, agg=agg, entropy=ent)
        pg, clipped, dual = policy_loss_per_token(lp, old, adv)
        kl = kl_penalty(lp, ref, "low_var_kl")
        assert loss.item() == pytest.approx(aggregate(pg, mask, agg).item() + 0.05 * aggregate(kl, mask, agg).item(),
                                            rel=1e-12)
        assert m["pg_loss"].item() == pytest.approx(aggregate(pg, mask, agg).item(), rel=1e-12)
        assert m["kl_loss"].item() == pytest.approx(aggregate(kl, mask, agg).item(), rel=1e-12)
    keep = mask.bool()
    assert m["clip_frac"].item() == pytest.approx(clipped[keep].double().mean().item(), rel=1e-12)
    assert m["clip_frac_dual"].item() == pytest.approx(dual[keep].double().mean().item(), rel=1e-12)
    assert m["approx_kl"].item() == pytest.approx((old - lp)[keep].mean().item(), rel=1e-12)
    assert m["neg_logprob"].item() == pytest.approx((-lp)[keep].mean().item(), rel=1e-12)
    assert m["entropy"].item() == pytest.approx(ent[keep].mean().item(), rel=1e-12)
    no_ref, m2 = grpo_loss_reference(lp, old, adv, mask)
    assert "kl_loss" not in m2 and no_ref.item() == pytest.approx(m2["pg_loss"].item(), rel=1e-12)
    with pytest.raises(ValueError, match="old_logprobs shape"):
        grpo_loss_reference(lp, old[:, :2], adv, mask)


# --------------------------------------------------------------------------------------------- config


def test_algo_config_defaults_are_pebr_settings_and_load_through_the_root_schema():
    cfg = AlgoConfig()
    assert (cfg.clip_low, cfg.clip_high, cfg.clip_dual) == (0.2, 0.3, 3.0)
    assert (cfg.kl_coef, cfg.kl_type, cfg.agg, cfg.adv_eps, cfg.norm_adv_by_std) == (
        1e-2, "low_var_kl", "token-mean", 1e-6, True)
    root = load_config(None, ["algo.agg=seq-mean-token-mean", "algo.kl_coef=0"])
    assert (root.algo.agg, root.algo.kl_coef) == ("seq-mean-token-mean", 0.0)
    with pytest.raises(ConfigError, match=r"algo\.kl_type.*low_var_kl"):
        load_config(None, ["algo.kl_type=k4"])
    with pytest.raises(ConfigError, match=r"algo\.clip_low"):
        load_config(None, ["algo.clip_low=1.5"])


@pytest.mark.parametrize("kl_type", ["k1", "k2", "low_var_kl"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_the_objective_matches_the_tests_own_formula_reference(agg, kl_type):
    """tests/helpers.py's loss (the one the actor tests compare with) and the library's agree, value and
    gradient, in every clip regime: two independent writings of the same formulas."""
    from helpers import grpo_loss_by_rows, grpo_token_losses

    g = _gen(11)
    b, t = 6, 13
    mask = (torch.arange(t)[None, :] < torch.tensor([13, 4, 1, 9, 7, 2])[:, None]).to(torch.float64)
    lp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = lp.detach() + torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios ~0.1 to ~10
    ref = lp.detach() + torch.randn(b, t, generator=g, dtype=torch.float64) * 1.5
    adv = torch.randn(b, generator=g, dtype=torch.float64)[:, None].expand(b, t)
    kw = dict(clip_low=0.2, clip_high=0.3, clip_dual=3.0, kl_coef=0.05, kl_type=kl_type)
    ours, _ = grpo_loss_reference(lp, old, adv, mask, ref, agg=agg, **kw)
    theirs = grpo_loss_by_rows(grpo_token_losses(lp, old, adv, ref, **kw), mask, agg)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12, abs=1e-14)
    (g_ours,) = torch.autograd.grad(ours, lp)
    (g_theirs,) = torch.autograd.grad(theirs, lp)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-14)
