"""The actor's packer: balanced micro-batch plans (equal counts on every data-parallel rank), the one
padding of every packed row to 16 x TP, and the target layout (fast, no model).

That the padding changes no log-prob, loss or gradient is checked end to end in tests/actor/test_actor.py (the
padded actor against transformers on unpadded samples, at TP=1, TP=2 and TP=2 with sequence parallelism).
"""
from __future__ import annotations

import random

import pytest
import torch

from pebr_mega.actor.packing import ActorSequence, pack, pack_micro_batches, plan_micro_batches, plan_stats
from pebr_mega.models.config import token_multiple


def _check_plan(lengths, budget, dp):
    plan = plan_micro_batches(lengths, budget, dp)
    assert len(plan) == dp
    counts = {len(rank) for rank in plan}
    assert len(counts) == 1, f"micro-batch counts differ across ranks: {[len(r) for r in plan]}"
    seen = sorted(i for rank in plan for group in rank for i in group)
    assert seen == list(range(len(lengths))), "every sequence exactly once"
    for rank in plan:
        for group in rank:
            assert group == sorted(group)
            assert len(group) <= 1 or sum(lengths[i] for i in group) <= budget
    return plan


def test_skewed_lengths_give_equal_counts_and_balanced_tokens_on_two_ranks():
    rng = random.Random(0)
    lengths = [2048, 1900] + [rng.randint(20, 300) for _ in range(30)]  # two giants, many small
    plan = _check_plan(lengths, 2048, 2)
    per_rank = [sum(lengths[i] for g in rank for i in g) for rank in plan]
    assert abs(per_rank[0] - per_rank[1]) <= max(lengths[2:])  # LPT: within one item of each other
    # the rank-local minimum would differ: the count is the largest one, used everywhere
    assert len(plan[0]) == len(plan[1]) >= 2


@pytest.mark.parametrize("dp", [1, 2, 3, 4])
def test_random_plans_are_valid(dp):
    rng = random.Random(dp)
    for _ in range(20):
        lengths = [rng.choice([rng.randint(1, 50), rng.randint(100, 900)]) for _ in range(rng.randint(1, 40))]
        _check_plan(lengths, rng.randint(200, 1000), dp)


def test_more_ranks_than_sequences_get_empty_micro_batches_and_none_when_empty():
    plan = _check_plan([30, 40], 100, 4)
    assert sum(1 for rank in plan for g in rank if not g) == 2
    assert plan_micro_batches([], 100, 2) == [[], []]


def test_oversized_sequence_gets_its_own_micro_batch():
    plan = _check_plan([500, 20, 30], 100, 1)
    assert [0] in plan[0]


def _positions(ids, grid):
    return torch.arange(len(ids)).expand(3, -1) + 7  # distinguishable from the padding's own 0, 1, ...


def _seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(10, 100, (n,), generator=g).tolist()
        mask = [0] * (n // 2) + [1] * (n - n // 2)
        mask[0] = 0
        out.append(ActorSequence(ids, mask, advantage=float(i), index=i,
                                 old_logprobs=-torch.rand(sum(mask), generator=g)))
    return out


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True), (3, False), (4, True)])
def test_every_row_is_padded_to_the_token_multiple_once(tp, sp):
    multiple = token_multiple(tp, sp)
    assert multiple % 16 == 0 and multiple % tp == 0 and (not sp or (multiple // tp) % 16 == 0)
    seqs = _seqs([13, 1 + 16, 40, 5, 64])
    lengths = [len(s.input_ids) for s in seqs]
    mbs = [mb for r in range(2) for mb in pack_micro_batches(seqs, 60, _positions, 2, r, multiple, pad_token_id=3)]
    for mb in mbs:
        real = sum(len(seqs[i].input_ids) for i in mb.indices)
        assert mb.num_tokens % multiple == 0 and mb.num_tokens - real == mb.pad < multiple + (real == 0) * multiple
        assert mb.position_ids.shape == (3, 1, mb.num_tokens)
        assert sum(mb.lengths) == mb.num_tokens and (mb.pad == 0 or mb.lengths[-1] == mb.pad)
        if mb.pad:  # the padding segment: its own positions 0.., pad ids, no target
            assert torch.equal(mb.position_ids[:, 0, real:], torch.arange(mb.pad).expand(3, -1))
            assert (mb.input_ids[0, real:] == 3).all()
            assert (mb.target_index < real).all()
    stats = plan_stats(plan_micro_batches(lengths, 60, 2), lengths, multiple)
    sizes = [mb.num_tokens for mb in mbs]
    assert stats["microbatch_tokens_min"] == min(sizes) and stats["microbatch_tokens_max"] == max(sizes)
    assert stats["padding_fraction"] == pytest.approx(sum(mb.pad for mb in mbs) / sum(sizes))


def test_target_layout_and_indices():
    seqs = _seqs([9, 4, 12])
    mb = pack(seqs, _positions, multiple=16)
    assert mb.num_tokens == 32 and mb.pad == 7
    starts = [0, 9, 13]
    for row, (s, start) in enumerate(zip(seqs, starts)):
        tgt = [j for j, m in enumerate(s.target_mask) if m]
        assert mb.target_mask[row].sum() == len(tgt)
        assert mb.target_ids[row, : len(tgt)].tolist() == [s.input_ids[j] for j in tgt]
        assert torch.equal(mb.advantages[row, : len(tgt)], torch.full((len(tgt),), float(row)))
    # target_index points at the position before each target; flat ids and to_layout invert each other
    ids = mb.input_ids[0]
    assert torch.equal(ids[mb.target_index + 1], mb.flat_target_ids)
    values = torch.randn(mb.num_targets)
    layout = mb.to_layout(values)
    assert torch.equal(layout[mb.target_mask != 0], values)
    assert torch.equal(layout[mb.target_mask == 0], torch.zeros(int((mb.target_mask == 0).sum())))
    assert torch.equal(mb.old_logprobs[mb.target_mask != 0], torch.cat([s.old_logprobs for s in seqs]))


def test_empty_micro_batch_is_one_padding_segment():
    mb = pack([], _positions, multiple=32)
    assert mb.num_tokens == 32 and mb.lengths == [32] and mb.num_targets == 0 and mb.target_mask.shape == (0, 1)
