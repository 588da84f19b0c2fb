"""Ctrl-C and SIGTERM during training: stop at the next step boundary, save, exit; a second one aborts.

`StopRequests` turns the first SIGINT or SIGTERM into a request: the step in progress finishes (its update,
metrics row, evaluation and periodic save), then the trainer saves that completed step, the one consistent
state there is, prints one line and exits (`StopRequested`, which the CLI reports with exit code 130). A
second signal raises `KeyboardInterrupt` where the program is, aborting without saving anything more: the
newest checkpoint stays what it was (a save cut short leaves only its temporary directory, which the next
save removes).

In a distributed job every rank may get the signal at a slightly different moment (torchrun forwards it to
each worker), so `agreed()` takes the request of any rank, with one all-reduce at each step boundary: all
ranks stop after the same step and save it together. (torchrun's agent sends SIGTERM to its workers when it
is stopped and SIGKILLs them after a grace period, `torch.distributed.elastic.multiprocessing.api`'s
`PContext.close(death_sig, timeout=30)`: a save longer than that is cut short like any kill, and the run
resumes from the checkpoint before.)

The handlers are installed only in the main thread (Python delivers signals there) and put back on exit.
The handler only sets a flag and writes its line with one `os.write`: it may run in the middle of a `print`,
and a buffered stream entered again from a handler raises.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """The run stopped at a step boundary on request (after saving); a rerun resumes from there."""


class StopRequests:
    """Context manager: the first SIGINT/SIGTERM sets `requested`, the second raises KeyboardInterrupt."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self.log = log or _write_stderr
        self.requested: str | None = None  # the name of the signal that asked to stop
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.requested = signal.Signals(signum).name
        self.log(f"{self.requested}: finishing the step in progress, then saving it and stopping "
                 "(press Ctrl-C again to abort without saving)")

    def request(self, name: str = "request") -> None:
        """Ask to stop, as the first signal does (for callers that stop a run themselves)."""
        self.requested = self.requested or name

    def agreed(self) -> bool:
        """Whether any rank has been asked to stop; a collective in a distributed job (call it on every rank
        at the same step boundary)."""
        asked = self.requested is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([1 if asked else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not asked:
                self.requested = "another rank's signal"
            asked = bool(flag.item())
        return asked


def _write_stderr(line: str) -> None:
    """One line to stderr without going through Python's buffered stream (safe inside a signal handler)."""
    try:
        os.write(sys.stderr.fileno(), (line + "\n").encode())
    except (OSError, ValueError):  # no usable stderr (closed, or replaced by an object without a descriptor)
        pass
