"""Checkpoint directories are atomic and pruned; the data order resumes exactly."""
from __future__ import annotations

import pytest

from pebr_mega.errors import CheckpointError
from pebr_mega.trainer.checkpointing import CheckpointManager
from pebr_mega.trainer.data_order import EpochSampler


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


def test_require_rejects_incomplete(tmp_path):
    (tmp_path / "step_5").mkdir()
    with pytest.raises(CheckpointError, match="step_5"):
        CheckpointManager(tmp_path).require(tmp_path / "step_5")


def test_resumed_order_equals_uninterrupted():
    records = list(range(11))
    full = EpochSampler(records, batch_size=4, seed=3)
    expected = [b for _, b in full.batches(7)]
    first = EpochSampler(records, batch_size=4, seed=3)
    got = [b for _, b in first.batches(4)]
    state = first.position.state_dict()
    second = EpochSampler(records, batch_size=4, seed=3)
    second.load_state_dict(state)
    got += [b for _, b in second.batches(3)]
    assert got == expected


def test_last_partial_batch_is_kept_and_every_record_seen():
    s = EpochSampler(list(range(10)), batch_size=4, seed=0)
    epoch0 = [b for e, b in s.batches(3)]
    assert [len(b) for b in epoch0] == [4, 4, 2]
    assert sorted(x for b in epoch0 for x in b) == list(range(10))
    assert s.position.epoch == 1 and s.steps_per_epoch() == 3
    d = EpochSampler(list(range(10)), batch_size=4, seed=0, drop_last=True)
    assert [len(b) for _, b in d.batches(3)] == [4, 4, 4] and d.steps_per_epoch() == 2
