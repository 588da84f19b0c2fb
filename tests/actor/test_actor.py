"""The Megatron actor against transformers + the GRPO objective: log-probs, losses, gradient norms, AdamW updates,
non-finite skips and freezing, at (TP, PP, DP) = (1,1,1), (2,1,1), (1,2,1) and (1,1,2), and at TP=2 with
sequence parallelism; both log-prob paths (target logits, hidden-state kernel); every aggregation mode.
Every packed micro-batch is padded (to 16, or 32 at TP=2 with SP), so equality with transformers on the
unpadded samples also shows that the padding changes no log-prob, loss or gradient.

One launch of two gloo ranks (CPU) does all the Megatron work: first each rank runs alone in a one-rank
world (the two ranks check different things at TP=PP=DP=1, side by side), then both join a two-rank world
and go through DP=2, TP=2 and PP=2. The references are computed here, in float64, with transformers'
`Qwen2_5_VLForConditionalGeneration`, the GRPO loss of `tests/helpers.py` and `torch.optim.AdamW`, on
image+text sequences of different lengths packed several to a micro-batch (one longer than a micro-batch).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from pebr_mega.parallel.launch import spawn
from helpers import (MB_TOKENS, MICRO, OPT, TEMPERATURE, actor_sequences, add_grpo_inputs, grpo_loss_spec, hf_model,
                     hf_target_logprobs, hf_weights, make_actor, make_sequences, reference_step, solo_world)

pytestmark = pytest.mark.slow

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
UNEVEN = (1, 3, 2)  # 133, 87 and 76 tokens: at DP=2 one rank gets 133, the other 87 + 76 > MB_TOKENS
LP_TOL = 1e-5
WEIGHT_TOL = 1e-5


# ------------------------------------------------------------------------------------------------ inputs


# --------------------------------------------------------------------------------------------- reference


# ----------------------------------------------------------------------------------------------- workers


def _step_with_weights(actor, seqs, loss, keep: bool) -> dict:
    metrics = actor.train_step(seqs, loss)
    weights = hf_weights(actor)  # collective: every rank takes part
    return {"metrics": metrics, "weights": weights if keep else None}


def _solo_checks_rank0(tiny, seqs, initial) -> dict:
    """TP=PP=DP=1: log-probs, two skipped updates then a real one, freezing."""
    from pebr_mega.actor.packing import ActorSequence

    out = {}
    actor = make_actor(tiny, 1, 1, **OPT)
    out["lp_111"] = actor.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    nan_old = [ActorSequence(**s.__dict__) for s in seqs]
    nan_old[2].old_logprobs = nan_old[2].old_logprobs.clone()
    nan_old[2].old_logprobs[1] = float("nan")
    inf_adv = [ActorSequence(**s.__dict__) for s in seqs]
    inf_adv[4].advantage = float("inf")
    out["skipped"] = [actor.train_step(bad, grpo_loss_spec()) for bad in (nan_old, inf_adv)]
    out["unchanged_after_skips"] = all(torch.equal(t, initial[n]) for n, t in hf_weights(actor).items())
    out["updates_after_skips"] = actor.updates
    out["grpo_111"] = _step_with_weights(actor, seqs, grpo_loss_spec(), keep=True)
    out["updates_after_step"] = actor.updates
    for freeze, kw in (("all", dict(freeze_vision=True, freeze_projector=True)), ("vision", dict(freeze_vision=True))):
        a = make_actor(tiny, 1, 1, **OPT, **kw)
        metrics = a.train_step(seqs, grpo_loss_spec())
        out[f"freeze_{freeze}"] = {"metrics": metrics,
                                   "changed": {n: not torch.equal(t, initial[n]) for n, t in hf_weights(a).items()}}
    return out


def _solo_checks_rank1(tiny, alt, seqs, seqs_alt) -> dict:
    """TP=PP=DP=1: every aggregation mode and SFT (lr 0: the weights stay), Megatron's decay rule, tied model."""
    from pebr_mega.actor.megatron_actor import LossSpec

    out = {}
    actor = make_actor(tiny, 1, 1, lr=0.0)
    for agg in AGG_MODES + (MICRO,):
        out[f"agg_{agg}_111"] = actor.train_step(seqs, grpo_loss_spec(agg))
    out["sft_111"] = actor.train_step(seqs, LossSpec("sft"))
    hidden = make_actor(tiny, 1, 1, lr=0.0, logprobs_from="hidden")  # the hidden-state path, torch reference
    out["lp_111_hidden"] = hidden.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    out["agg_token-mean_111_hidden"] = hidden.train_step(seqs, grpo_loss_spec())
    out["wd_megatron_111"] = _step_with_weights(make_actor(tiny, 1, 1, **OPT, decay_all_params=False), seqs, grpo_loss_spec(), True)
    out["alt_111"] = _step_with_weights(make_actor(alt, 1, 1, **OPT), seqs_alt, grpo_loss_spec(), True)
    return out


def _actor_worker(rank, tiny, alt, seqs_plain, alt_plain):
    import torch
    from safetensors.torch import load_file

    from pebr_mega.actor.megatron_actor import LossSpec
    from pebr_mega.parallel.groups import destroy_parallel, init_parallel

    torch.set_num_threads(1)  # two ranks share two cores
    seqs, seqs_alt = actor_sequences(seqs_plain), actor_sequences(alt_plain)
    initial = load_file(f"{tiny}/model.safetensors")
    keep = rank == 0

    solo_world()
    init_parallel(1, 1)
    out = _solo_checks_rank0(tiny, seqs, initial) if rank == 0 else _solo_checks_rank1(tiny, alt, seqs, seqs_alt)
    destroy_parallel(process_group=True)

    init_parallel(1, 1)  # DP = 2
    actor = make_actor(tiny, 1, 1, lr=0.0)
    out["lp_112"] = actor.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    out["lp_112_one_seq"] = actor.compute_logprobs(seqs[:1], TEMPERATURE)  # rank 1 has nothing to do
    for agg in AGG_MODES + (MICRO,):
        out[f"agg_{agg}_112"] = actor.train_step(seqs, grpo_loss_spec(agg))
    out["sft_112"] = actor.train_step(seqs, LossSpec("sft"))
    # one rank holds a single sequence, the other two that need two micro-batches: the first rank runs an
    # empty (padding-only) micro-batch so that both run two
    out["empty_mb_112"] = actor.train_step([seqs[i] for i in UNEVEN], grpo_loss_spec())
    out["grpo_112"] = _step_with_weights(make_actor(tiny, 1, 1, **OPT), seqs, grpo_loss_spec(), keep)


    init_parallel(2, 1)
    actor = make_actor(tiny, 2, 1, **OPT)
    out["lp_211"] = actor.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    out["grpo_211"] = _step_with_weights(actor, seqs, grpo_loss_spec(), keep)
    # The GPU code path: the Triton log-prob (vocab-parallel) and GRPO-loss kernels, here in Triton's interpreter.
    triton = make_actor(tiny, 2, 1, kernels="triton", lr=0.0)
    out["lp_211_triton"] = triton.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    out["agg_token-mean_211_triton"] = triton.train_step(seqs, grpo_loss_spec())
    # the vocab-parallel hidden-state kernel (interpreted), and sequence parallelism (rows padded to 32)
    fused = make_actor(tiny, 2, 1, kernels="triton", lr=0.0, logprobs_from="hidden")
    out["lp_211_hidden"] = fused.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    out["agg_token-mean_211_hidden"] = fused.train_step(seqs, grpo_loss_spec())
    sp = make_actor(tiny, 2, 1, sequence_parallel=True, **OPT)
    out["lp_211_sp"] = sp.compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    out["grpo_211_sp"] = _step_with_weights(sp, seqs, grpo_loss_spec(), keep)

    init_parallel(1, 2)
    out["lp_121"] = make_actor(tiny, 1, 2, lr=0.0).compute_logprobs(seqs, TEMPERATURE, with_entropy=True)
    out["alt_121"] = _step_with_weights(make_actor(alt, 1, 2, **OPT), seqs_alt, grpo_loss_spec(), keep)
    return out


# ------------------------------------------------------------------------------------------------ fixture
@pytest.fixture(scope="module")
def actor_steps(tiny_model_dir, tiny_model_dir_alt):
    """The actor's steps on two gloo ranks in every layout (`results`, per rank), their float64 references
    (`refs`) and the sequences they ran on (`seqs`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls beside two busy ranks: one thread is far faster than two contending
    try:
        return _run(tiny_model_dir, tiny_model_dir_alt)
    finally:
        torch.set_num_threads(before)


def _run(tiny_model_dir, tiny_model_dir_alt) -> dict:
    from pebr_mega.actor.packing import plan_micro_batches

    seqs, seqs_alt = make_sequences(tiny_model_dir, 0), make_sequences(tiny_model_dir_alt, 1)
    with torch.no_grad():
        lp_ref = hf_target_logprobs(hf_model(tiny_model_dir), seqs, TEMPERATURE)
        lp_alt = hf_target_logprobs(hf_model(tiny_model_dir_alt), seqs_alt, TEMPERATURE)
    add_grpo_inputs(seqs, [lp for lp, _ in lp_ref], seed=2)
    add_grpo_inputs(seqs_alt, [lp for lp, _ in lp_alt], seed=3)
    with ThreadPoolExecutor(1) as pool:  # the references are computed while the ranks work
        job = pool.submit(spawn, _actor_worker, 2, str(tiny_model_dir), str(tiny_model_dir_alt), seqs, seqs_alt)
        refs = {"lp": lp_ref, "grpo": reference_step(tiny_model_dir, seqs, opt=OPT),
                "alt": reference_step(tiny_model_dir_alt, seqs_alt, opt=OPT),
                "wd_megatron": reference_step(tiny_model_dir, seqs, opt=OPT, decay_all=False),
                "sft": reference_step(tiny_model_dir, seqs, kind="sft"),
                "freeze_all": reference_step(tiny_model_dir, seqs, freeze="all"),
                "freeze_vision": reference_step(tiny_model_dir, seqs, freeze="vision")}
        for agg in AGG_MODES:
            refs[f"agg_{agg}"] = reference_step(tiny_model_dir, seqs, agg=agg)
        refs["uneven"] = reference_step(tiny_model_dir, [seqs[i] for i in UNEVEN])
        lengths = [len(s["input_ids"]) for s in seqs]
        for dp in (1, 2):
            plan = plan_micro_batches(lengths, MB_TOKENS, dp)
            refs[f"agg_{MICRO}_dp{dp}"] = reference_step(tiny_model_dir, seqs, agg=MICRO, plan=plan)
        results = job.result()
    return {"seqs": seqs, "refs": refs, "results": results}


# ------------------------------------------------------------------------------------------------- tests
def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _assert_weights(got: dict, ref: dict, what: str, tied: bool = False) -> None:
    expected = {n for n in ref if not (tied and n == "lm_head.weight")}
    assert set(got) == expected, f"{what}: names differ: {sorted(set(got) ^ expected)[:6]}"
    worst = max(((float((torch.as_tensor(got[n]).double() - ref[n]).abs().max()), n) for n in got))
    assert worst[0] < WEIGHT_TOL, f"{what}: max |weight diff| {worst[0]:.2e} at {worst[1]}"


@pytest.mark.parametrize("layout,rank", [("111", 0), ("211", 0), ("211", 1), ("121", 0), ("121", 1),
                                         ("112", 0), ("112", 1), ("211_triton", 0), ("211_triton", 1),
                                         ("111_hidden", 1), ("211_hidden", 0), ("211_hidden", 1),
                                         ("211_sp", 0), ("211_sp", 1)])
def test_logprobs_and_entropies_match_transformers(actor_steps, layout, rank):
    got = actor_steps["results"][rank][f"lp_{layout}"]
    assert len(got) == len(actor_steps["refs"]["lp"])
    for i, ((lp, ent), (ref_lp, ref_ent)) in enumerate(zip(got, actor_steps["refs"]["lp"])):
        assert lp.shape == ref_lp.shape == (sum(actor_steps["seqs"][i]["target_mask"]),)
        assert float((torch.as_tensor(lp).double() - ref_lp).abs().max()) < LP_TOL, f"seq {i} log-probs"
        assert float((torch.as_tensor(ent).double() - ref_ent).abs().max()) < LP_TOL, f"seq {i} entropies"


def test_logprobs_when_a_data_parallel_rank_has_no_sequence(actor_steps):
    want = actor_steps["refs"]["lp"][0][0]
    for r in actor_steps["results"]:
        (lp, ent), = r["lp_112_one_seq"]
        assert ent is None and float((torch.as_tensor(lp).double() - want).abs().max()) < LP_TOL


@pytest.mark.parametrize("case,ref,tied", [("grpo_111", "grpo", False), ("grpo_112", "grpo", False),
                                           ("grpo_211", "grpo", False), ("grpo_211_sp", "grpo", False),
                                           ("alt_111", "alt", True),
                                           ("alt_121", "alt", True), ("wd_megatron_111", "wd_megatron", False)])
def test_grpo_step_loss_grad_norm_and_adamw_update(actor_steps, case, ref, tied):
    """One real step: loss and global grad norm (before clipping) as the reference's, weights as AdamW's."""
    rank = 1 if case in ("alt_111", "wd_megatron_111") else 0
    got, want = actor_steps["results"][rank][case], actor_steps["refs"][ref]
    m = got["metrics"]
    assert m["skipped"] == 0.0 and m["lr"] == pytest.approx(OPT["lr"])
    assert abs(m["loss"] - want["loss"]) < 1e-5, (m["loss"], want["loss"])
    assert _rel(m["grad_norm"], want["grad_norm"]) < 1e-5, (m["grad_norm"], want["grad_norm"])
    assert m["grad_norm"] > OPT["clip_grad"]  # the clipping path is taken
    _assert_weights(got["weights"], want["weights"], case, tied)


def test_grpo_step_results_agree_on_every_rank(actor_steps):
    for case in ("grpo_112", "grpo_211", "grpo_211_sp", "alt_121"):
        a, b = (r[case]["metrics"] for r in actor_steps["results"])
        assert a == b, case


def test_decay_rule_matters(actor_steps):
    """Megatron's default (no decay on biases and norms) and the recipe's (decay everywhere) differ."""
    a = actor_steps["refs"]["grpo"]["weights"]["model.norm.weight"]
    b = actor_steps["refs"]["wd_megatron"]["weights"]["model.norm.weight"]
    assert float((a - b).abs().max()) > 5 * WEIGHT_TOL


@pytest.mark.parametrize("agg", AGG_MODES)
def test_aggregation_modes_normalise_over_micro_batches_and_dp(actor_steps, agg):
    want = actor_steps["refs"][f"agg_{agg}"]
    single = actor_steps["results"][1][f"agg_{agg}_111"]
    for r in actor_steps["results"]:
        dp2 = r[f"agg_{agg}_112"]
        for m, what in ((single, "DP=1"), (dp2, "DP=2")):
            assert abs(m["loss"] - want["loss"]) < 1e-5, (what, m["loss"], want["loss"])
            assert _rel(m["grad_norm"], want["grad_norm"]) < 1e-5, (what, m["grad_norm"], want["grad_norm"])
        assert _rel(dp2["grad_norm"], single["grad_norm"]) < 1e-6 and abs(dp2["loss"] - single["loss"]) < 1e-6
    losses = {a: actor_steps["refs"][f"agg_{a}"]["loss"] for a in AGG_MODES}
    assert len({round(v, 6) for v in losses.values()}) == 3  # the modes are really different numbers


@pytest.mark.parametrize("case,ranks", [("211_triton", (0, 1)), ("211_hidden", (0, 1)), ("111_hidden", (1,))])
def test_fused_kernels_and_log_prob_paths_in_the_actor_match_the_reference(actor_steps, case, ranks):
    """The fused kernels (interpreted on CPU) and the hidden-state log-prob path: loss and gradient norm."""
    want = actor_steps["refs"]["agg_token-mean"]
    for r in ranks:
        m = actor_steps["results"][r][f"agg_token-mean_{case}"]
        assert abs(m["loss"] - want["loss"]) < 1e-5 and _rel(m["grad_norm"], want["grad_norm"]) < 1e-5


def test_micro_batch_token_mean_matches_easyr1_on_its_own_micro_batches(actor_steps):
    """`token-mean-microbatch` at DP=1 and DP=2, each against the float64 reference on the same partition;
    unlike the global modes it depends on the partition, so the two layouts give different numbers."""
    results = actor_steps["results"]
    got = {1: [results[1][f"agg_{MICRO}_111"]], 2: [r[f"agg_{MICRO}_112"] for r in results]}
    for dp, metrics in got.items():
        want = actor_steps["refs"][f"agg_{MICRO}_dp{dp}"]
        for m in metrics:
            assert abs(m["loss"] - want["loss"]) < 1e-5, (dp, m["loss"], want["loss"])
            assert _rel(m["grad_norm"], want["grad_norm"]) < 1e-5, (dp, m["grad_norm"], want["grad_norm"])
    assert abs(actor_steps["refs"][f"agg_{MICRO}_dp1"]["loss"] - actor_steps["refs"][f"agg_{MICRO}_dp2"]["loss"]) > 1e-4
    assert abs(actor_steps["refs"][f"agg_{MICRO}_dp1"]["loss"] - actor_steps["refs"]["agg_token-mean"]["loss"]) > 1e-4


def test_an_empty_micro_batch_keeps_counts_equal_and_changes_nothing(actor_steps):
    from pebr_mega.actor.packing import plan_micro_batches

    plan = plan_micro_batches([len(actor_steps["seqs"][i]["input_ids"]) for i in UNEVEN], MB_TOKENS, 2)
    assert [len(r) for r in plan] == [2, 2] and any(not g for r in plan for g in r), plan
    want = actor_steps["refs"]["uneven"]
    for r in actor_steps["results"]:
        m = r["empty_mb_112"]
        assert abs(m["loss"] - want["loss"]) < 1e-5 and _rel(m["grad_norm"], want["grad_norm"]) < 1e-5


def test_micro_batches_are_padded_and_reported(actor_steps):
    for case, multiple in (("grpo_111", 16), ("grpo_211_sp", 32)):
        m = actor_steps["results"][0][case]["metrics"]
        assert 0 < m["actor/padding_fraction"] < 0.5
        assert m["actor/microbatch_tokens_min"] % multiple == 0 and m["actor/microbatch_tokens_max"] % multiple == 0
        assert m["actor/microbatch_tokens_min"] <= m["actor/microbatch_tokens_max"] <= MB_TOKENS + multiple


def test_sft_loss_is_token_mean_nll(actor_steps):
    want = actor_steps["refs"]["sft"]
    results = actor_steps["results"]
    for m in (results[1]["sft_111"], results[0]["sft_112"], results[1]["sft_112"]):
        assert abs(m["loss"] - want["loss"]) < 1e-5 and _rel(m["grad_norm"], want["grad_norm"]) < 1e-5
        assert m["train_tokens"] == sum(sum(s["target_mask"]) for s in actor_steps["seqs"])


def test_non_finite_loss_skips_the_update_and_training_goes_on(actor_steps):
    r = actor_steps["results"][0]
    for m in r["skipped"]:
        assert m["skipped"] == 1.0 and not math.isfinite(m["loss"])
    assert r["unchanged_after_skips"] and r["updates_after_skips"] == 0
    # the next, finite step is exactly a first step (same as a fresh actor's, checked against AdamW above)
    assert r["grpo_111"]["metrics"]["skipped"] == 0.0 and r["updates_after_step"] == 1


@pytest.mark.parametrize("freeze", ["all", "vision"])
def test_frozen_parts_stay_bit_identical(actor_steps, freeze):
    got = actor_steps["results"][0][f"freeze_{freeze}"]
    changed = got["changed"]
    for name, c in changed.items():
        frozen = name.startswith("visual.") and (freeze == "all" or ".merger." not in f".{name}")
        assert c != frozen, f"{name}: changed={c} with freeze={freeze}"
    want = actor_steps["refs"][f"freeze_{freeze}"]
    assert _rel(got["metrics"]["grad_norm"], want["grad_norm"]) < 1e-5  # frozen parts are not in the norm
    assert abs(got["metrics"]["loss"] - want["loss"]) < 1e-5
