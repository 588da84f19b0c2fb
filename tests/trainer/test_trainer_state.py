"""Checkpoint directories are atomic and pruned; the data order resumes exactly."""
from __future__ import annotations

import pytest
import torch

from pebr_mega.run.stage_checkpoints import CheckpointManager
from pebr_mega.trainer.data_order import DataPosition, EpochSampler


def _batches(sampler: EpochSampler, n: int) -> list:
    """`n` successive (epoch, batch) pairs of `sampler`, as the trainer draws them."""
    return [sampler.next_batch() for _ in range(n)]


def _write(tag):
    def write(d):
        (d / "weights.bin").write_text(tag)
    return write


def test_keep_last_and_latest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for s in (1, 2, 3):
        m.save(s, _write(f"w{s}"))
    assert m.steps() == [2, 3]
    assert (m.latest() / "weights.bin").read_text() == "w3"


def test_crash_mid_save_keeps_last_good(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(1, _write("good"))

    def crash(d):
        (d / "weights.bin").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        m.save(2, crash)
    assert m.steps() == [1] and (m.latest() / "weights.bin").read_text() == "good"
    m.save(2, _write("second"))  # the stale temporary directory is cleaned up
    assert m.steps() == [1, 2] and not list(tmp_path.glob(".tmp-*"))
    m.save(2, _write("again"))  # re-saving a step replaces it
    assert (m.path(2) / "weights.bin").read_text() == "again"


def test_resumed_order_equals_uninterrupted():
    records = list(range(11))
    full = EpochSampler(records, batch_size=4, seed=3)
    expected = [b for _, b in _batches(full, 7)]
    first = EpochSampler(records, batch_size=4, seed=3)
    got = [b for _, b in _batches(first, 4)]
    state = first.position.state_dict()
    second = EpochSampler(records, batch_size=4, seed=3)
    second.load_state_dict(state)
    got += [b for _, b in _batches(second, 3)]
    assert got == expected


def test_last_partial_batch_is_kept_and_every_record_seen():
    s = EpochSampler(list(range(10)), batch_size=4, seed=0)
    epoch0 = [b for e, b in _batches(s, 3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(x for b in epoch0 for x in b) == list(range(10))
    assert s.position.epoch == 1 and s.steps_per_epoch() == 3


def _torch_loader_batches(n: int, batch: int, seed: int, epochs: int, drop_last: bool) -> list[list[int]]:
    """Upstream's order, from torch itself: EasyR1's RandomSampler with a generator seeded once, in a DataLoader."""
    from torch.utils.data import DataLoader, RandomSampler

    data = list(range(n))
    g = torch.Generator()
    g.manual_seed(seed)
    loader = DataLoader(data, batch_size=batch, sampler=RandomSampler(data, generator=g), drop_last=drop_last,
                        collate_fn=list)
    return [list(b) for _ in range(epochs) for b in loader]


@pytest.mark.parametrize("n,batch,drop_last", [(11, 4, True), (12, 4, True), (10, 4, False), (7, 7, True)])
def test_order_is_torch_random_sampler_order_epoch_after_epoch(n, batch, drop_last):
    epochs = 3
    s = EpochSampler(list(range(n)), batch_size=batch, seed=1, drop_last=drop_last)
    expected = _torch_loader_batches(n, batch, seed=1, epochs=epochs, drop_last=drop_last)
    got = [b for _, b in _batches(s, s.steps_per_epoch() * epochs)]
    assert got == expected
    k = s.steps_per_epoch()
    for e in range(epochs):  # within an epoch no record repeats; with the partial batch kept, all are seen
        seen = [x for b in got[e * k:(e + 1) * k] for x in b]
        assert len(set(seen)) == len(seen) == (k * batch if drop_last else n)
    if n > batch:
        assert got[0] != got[k]  # a fresh permutation each epoch


def test_rl_epochs_drop_the_partial_batch():
    """Issue 13, item 4: 1,100 prompts at batch 512 for 2 epochs are 4 full batches, 2 per epoch, each epoch a
    permutation of its own; 76 prompts sit out of each epoch."""
    s = EpochSampler(list(range(1100)), batch_size=512, seed=1, drop_last=True)
    assert (s.steps_per_epoch(), s.dropped_per_epoch()) == (2, 76)
    steps = list(_batches(s, 4))
    assert [e for e, _ in steps] == [0, 0, 1, 1] and all(len(b) == 512 for _, b in steps)
    for e in (0, 1):
        seen = steps[2 * e][1] + steps[2 * e + 1][1]
        assert len(set(seen)) == 1024
    assert steps[0][1] != steps[2][1]
    assert s.position == DataPosition(2, 0)
    with pytest.raises(ValueError, match="no full batch"):
        EpochSampler(list(range(3)), batch_size=4, seed=0, drop_last=True)


def test_resume_from_every_position_with_drop_last():
    records = list(range(11))
    full = [b for _, b in _batches(EpochSampler(records, 4, seed=5, drop_last=True), 6)]
    for cut in range(6):
        first = EpochSampler(records, 4, seed=5, drop_last=True)
        got = [b for _, b in _batches(first, cut)]
        second = EpochSampler(records, 4, seed=5, drop_last=True)
        second.load_state_dict(first.position.state_dict())
        assert got + [b for _, b in _batches(second, 6 - cut)] == full
