"""The on-policy GRPO update (`LossSpec(on_policy=True)`, one update per rollout step): the update's own
forward stands for the old policy's log-probs, so the step saves a forward pass over the batch and must give
what a separate `compute_logprobs` pass followed by the update gives: the same loss, gradient norm, weights
and train-inference mismatch (against `algo.mismatch.token_mult_prob_error` on the separate pass).
Checked on one gloo rank, for the torch path and the fused Triton (interpreter) kernels, on image+text
sequences packed several to a micro-batch, with advantages of both signs and engine log-probs scattered
around the actor's, a KL term against reference log-probs; one sequence has no engine log-probs (its
tokens are left out of the mismatch, as the metric does)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pebr_mega.parallel.launch import spawn
from helpers import TEMPERATURE, actor_sequences, grpo_loss_spec, hf_weights, make_actor, make_sequences, solo_world

pytestmark = pytest.mark.slow


def _worker(rank, tiny, plain, kernels):
    from dataclasses import replace

    from pebr_mega.parallel.groups import init_parallel
    from pebr_mega.algo.mismatch import token_mult_prob_error

    torch.set_num_threads(1)
    solo_world()
    init_parallel(1, 1)
    seqs = actor_sequences(plain)
    for s, p in zip(seqs, plain):
        s.rollout_logprobs = None if p["rollout_logprobs"] is None else torch.as_tensor(p["rollout_logprobs"])
    out = {}
    # Two-pass: old log-probs from a separate forward, then the update.
    two = make_actor(tiny, 1, 1, kernels=kernels, lr=1e-3, clip_grad=1.0)
    old = two.compute_logprobs(seqs, TEMPERATURE)
    out["mismatch_two_pass"] = token_mult_prob_error([lp for lp, _ in old], [s.rollout_logprobs for s in seqs])
    with_old = [replace(s, old_logprobs=lp, rollout_logprobs=None) for s, (lp, _) in zip(seqs, old)]
    out["two_pass"] = two.train_step(with_old, grpo_loss_spec())
    out["two_pass_weights"] = hf_weights(two)
    # On policy: the same actor state, no old log-probs, the engine's log-probs for the mismatch.
    one = make_actor(tiny, 1, 1, kernels=kernels, lr=1e-3, clip_grad=1.0)
    spec = grpo_loss_spec()
    out["on_policy"] = one.train_step(seqs, replace(spec, on_policy=True))
    out["on_policy_weights"] = hf_weights(one)
    try:
        one.train_step(with_old, replace(spec, on_policy=True))
    except ValueError as e:
        out["refused"] = str(e)
    return out


@pytest.fixture(scope="module", params=["torch", "triton"])
def results(request, tiny_model_dir):
    plain = make_sequences(tiny_model_dir, 5)
    rng = np.random.default_rng(7)
    for i, s in enumerate(plain):
        s["advantage"] = float(rng.normal(0, 1.0)) if i != 1 else -1.3
        n = int(sum(s["target_mask"]))
        s["old_logprobs"] = None
        s["ref_logprobs"] = (-rng.gamma(1.5, 0.8, n)).astype(np.float32)  # the helpers' loss has a KL term
        # plausible engine log-probs: negative, spread like a small model's
        s["rollout_logprobs"] = None if i == 2 else (-rng.gamma(1.5, 0.8, n)).astype(np.float32)
    return spawn(_worker, 1, str(tiny_model_dir), plain, request.param)[0]


def test_on_policy_update_equals_the_two_pass_update(results):
    a, b = results["on_policy"], results["two_pass"]
    assert a["skipped"] == b["skipped"] == 0.0
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert a["clip_frac"] == b["clip_frac"] == 0.0  # ratio 1: nothing clips on the step's first update
    worst = max(float((torch.as_tensor(results["on_policy_weights"][n]).double() - torch.as_tensor(t).double()).abs().max())
                for n, t in results["two_pass_weights"].items())
    assert worst < 1e-6, worst


def test_on_policy_update_reports_the_mismatch_of_the_separate_pass(results):
    got = results["on_policy"]["mismatch/token_mult_prob_error"]
    assert got > 1.5  # the engine's log-probs are far from the actor's: the metric is not trivially 1
    assert got == pytest.approx(results["mismatch_two_pass"], rel=1e-5)
    assert "mismatch/token_mult_prob_error" not in results["two_pass"]  # no engine log-probs given


def test_on_policy_update_refuses_sequences_with_old_logprobs(results):
    assert "on-policy update computes its own old log-probs" in results["refused"]
