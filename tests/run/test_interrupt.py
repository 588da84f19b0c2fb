"""Ctrl-C / SIGTERM handling of the training loop (issue 12, item 3): the first signal asks to stop at the next
step boundary, the second aborts; the process's own handlers come back afterwards. The trainer's use of it
(the finished step saved, nothing more after an abort, the resumed metrics equal) is checked on real runs in
tests/trainer/test_trainer.py."""
from __future__ import annotations

import os
import signal

import pytest

from pebr_mega.run.interrupt import StopRequested, StopRequests


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_asks_to_stop_and_the_second_aborts(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    lines: list[str] = []
    with StopRequests(lines.append) as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), sig)
        assert stop.requested == sig.name and stop.agreed()
        assert "again to abort" in lines[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_stop_is_a_keyboard_interrupt_for_callers_that_only_know_that():
    assert issubclass(StopRequested, KeyboardInterrupt)
    with StopRequests() as stop:
        stop.request("test")
        assert stop.agreed() and stop.requested == "test"
