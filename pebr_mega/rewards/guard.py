"""Reward functions under a per-sample time limit: a pool of worker processes with deadlines.

MathRuler's `grade_answer` hands answers to sympy, and some answers never finish grading (`9**9**9**9`
against a non-integer ground truth, `9999999!`, `(x+1)**10000` against `x`): Python big-integer arithmetic
holds the GIL inside one C call, so neither a thread nor `signal.alarm` can interrupt it. Math-RL verifiers
therefore grade in separate processes and kill the ones that overrun; this module does the same.

- `RewardPool(timeout_s, num_workers)` keeps `num_workers` processes, each with its own pipe. `run(calls)`
  sends them chunks of `(function, args)` calls; a worker answers call by call, so the parent knows when each
  call started. A call running longer than `timeout_s` is a `timeout`: the worker is killed and replaced and
  the rest of its chunk goes back to the queue. A worker that dies (a crash, the memory cap) is replaced the
  same way and its call is an `error`. Nothing a call does can stop `run` from returning.
- Functions are sent by reference (pickled by module and name), so they must be module-level and pure.
- Workers are fresh interpreters (`python -c ...`, not `multiprocessing`: nothing re-imports the trainer's
  main module, no fork of a process holding CUDA and threads, no fork server or resource tracker that a
  SIGKILLed trainer would leave behind). A worker says when it is up, and only then does a call's clock
  start; starting one (importing sympy) takes about a second, and a replacement starts while the other
  workers go on. Workers ignore Ctrl-C (the parent handles it), die with their parent
  (`pebr_mega.lifetime.die_with_parent`) and may get an address-space cap (`memory_mb`) so that a runaway
  answer fails fast instead of swapping.
- `score_components(pool, per_sample)` is what the reward model, sampling and evaluation use: one call per
  sample running all of that sample's text components, so the time limit is per sample.
- `shared_pool` keeps one pool per setting per process (so one per training rank: 4 workers x 8 ranks on an
  8-GPU node, ~100 MB each with sympy loaded), started on first use and stopped at exit. A worker dies with
  the thread that started it: use the pool from a thread that lives as long as the run (the main thread).

What runs where: the text rewards (format, accuracy, keyword, length) run in the workers; the CLIP reward
stays in the parent (a torch model, possibly on a GPU: copying it into every worker would multiply its
memory, and CUDA does not survive a fork). CLIP's cost does not depend on what the answer says: the text is
truncated to `rewards.clip_max_text_tokens` and images are resized to `rewards.clip_image_size`.
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Sequence

from pebr_mega.lifetime import die_with_parent

OK, ERROR, TIMEOUT = "ok", "error", "timeout"
READY = "ready"
START_TIMEOUT_S = 300.0  # a worker that has not started by then means the installation is broken
Call = tuple[Callable[..., Any], tuple]
# What a worker imports before it says it is up, so that the first call does not pay for sympy's import.
PRELOAD = ("pebr_mega.rewards.text", "mathruler.grader")


@dataclass
class Outcome:
    """How one call ended: `ok` with its value, `error` with the exception text, or `timeout`."""

    status: str
    value: Any = None
    error: str = ""


# ---------------------------------------------------------------------------------------------- worker
def _limit_memory(memory_mb: int) -> None:
    if memory_mb <= 0:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_mb << 20
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):  # not on this platform, or not allowed: run without the cap
        pass


def worker_main(fd: int, memory_mb: int) -> None:
    """A worker (run as `python -c`, see `RewardPool._start_worker`): receive chunks of calls over the socket
    `fd`, answer each call as soon as it returns; exit on None or when the parent is gone."""
    import importlib

    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(memory_mb)
    conn = Connection(fd)
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:  # reported by the call that needs it
            pass
    try:
        conn.send(READY)  # the parent starts a call's clock only once the worker is up (start-up may be slow)
    except (BrokenPipeError, EOFError, OSError):
        return
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for fn, args in chunk:
            try:
                reply = (OK, fn(*args), "")
            except BaseException as e:  # noqa: BLE001 (MemoryError, RecursionError, ... are the call's failure)
                reply = (ERROR, None, f"{type(e).__name__}: {e}"[:300])
            try:
                conn.send(reply)
            except (BrokenPipeError, EOFError, OSError):
                return


@dataclass
class _Worker:
    proc: Any
    conn: Any
    chunk: list[int] | None = None  # indices of the calls sent and not yet answered ...
    pos: int = 0  # ... of which chunk[pos] is running
    started: float = 0.0  # when chunk[pos] started (monotonic)
    ready: bool = False  # the worker said it is up
    born: float = field(default_factory=time.monotonic)


# ---------------------------------------------------------------------------------------------- pool
@dataclass
class PoolStats:
    """What the pool has seen since it started."""

    calls: int = 0
    timeouts: int = 0
    worker_deaths: int = 0
    replaced: int = 0
    last_error: str = field(default="")


class RewardPool:
    """`num_workers` processes that run `(function, args)` calls, each within `timeout_s` seconds."""

    def __init__(self, timeout_s: float, num_workers: int, memory_mb: int = 0) -> None:
        if not timeout_s > 0 or not math.isfinite(timeout_s):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.memory_mb = memory_mb
        self.stats = PoolStats()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    # ------------------------------------------------------------------------------------------ workers
    def _start_worker(self) -> _Worker:
        parent_end, child_end = socket.socketpair()
        # The worker resolves imports as this process does (its sys.path, e.g. a checkout on PYTHONPATH).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        code = f"from pebr_mega.rewards.guard import worker_main; worker_main({child_end.fileno()}, {self.memory_mb})"
        proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child_end.fileno()], env=env,
                                stdin=subprocess.DEVNULL, close_fds=True)
        child_end.close()  # only the worker holds it now: its death reads as EOF here
        return _Worker(proc, Connection(parent_end.detach()))

    def _replace(self, w: _Worker) -> _Worker:
        _stop(w.proc)
        w.conn.close()
        self.stats.replaced += 1
        fresh = self._start_worker()
        self._workers[self._workers.index(w)] = fresh
        return fresh

    def _ensure_started(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError("a RewardPool cannot be used from a forked child of the process that made it")
        while len(self._workers) < self.num_workers:
            self._workers.append(self._start_worker())

    def _await_start(self, w: _Worker) -> None:
        """Read a starting worker's READY; one that dies or hangs while starting is a broken installation."""
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            _stop(w.proc)
            raise RuntimeError(f"a reward worker died while starting (exit code {w.proc.returncode}); run "
                               "`python -c 'import pebr_mega.rewards.guard, mathruler.grader'` to see why") from None
        if msg != READY:
            raise RuntimeError(f"a reward worker sent {msg!r} instead of {READY!r}")
        w.ready = True

    # ------------------------------------------------------------------------------------------ running
    def run(self, calls: Sequence[Call]) -> list[Outcome]:
        """Run every call; returns one `Outcome` per call, in order. Never raises because of a call."""
        with self._lock:
            return self._run(list(calls))

    def _run(self, calls: list[Call]) -> list[Outcome]:
        out: list[Outcome | None] = [None] * len(calls)
        if not calls:
            return []
        self._ensure_started()
        pending = deque(range(len(calls)))
        # Chunks amortise the send; small enough that requeueing after a kill costs little.
        chunk_size = max(1, min(64, math.ceil(len(calls) / (4 * self.num_workers))))
        while pending or any(w.chunk for w in self._workers):
            self._dispatch(calls, pending, chunk_size)
            busy = [w for w in self._workers if w.chunk]
            starting = [w for w in self._workers if not w.ready]
            deadlines = [w.started + self.timeout_s for w in busy] + [w.born + START_TIMEOUT_S for w in starting]
            ready = wait([w.conn for w in busy + starting], timeout=max(0.0, min(deadlines) - time.monotonic()))
            for w in starting:
                if w.conn in ready:
                    self._await_start(w)
                elif time.monotonic() - w.born > START_TIMEOUT_S:
                    raise RuntimeError(f"a reward worker did not start within {START_TIMEOUT_S:.0f} s")
            for w in busy:
                if w.conn in ready:
                    self._collect(w, out, pending)
            now = time.monotonic()
            for w in [w for w in self._workers if w.chunk and now - w.started >= self.timeout_s]:
                self._finish_current(w, Outcome(TIMEOUT, error=f"no result within {self.timeout_s:g} s"), out, pending)
                self.stats.timeouts += 1
        self.stats.calls += len(calls)
        return out  # type: ignore[return-value]

    def _dispatch(self, calls: list[Call], pending: deque, chunk_size: int) -> None:
        for w in list(self._workers):
            if w.chunk or not w.ready or not pending:
                continue
            chunk = [pending.popleft() for _ in range(min(chunk_size, len(pending)))]
            try:
                w.conn.send([calls[i] for i in chunk])
            except (BrokenPipeError, EOFError, OSError):  # the worker died while idle: a new one takes the chunk
                pending.extendleft(reversed(chunk))
                self.stats.worker_deaths += 1
                w = self._replace(w)
                continue
            w.chunk, w.pos, w.started = chunk, 0, time.monotonic()

    def _collect(self, w: _Worker, out: list, pending: deque) -> None:
        """Read every reply the worker has sent; a closed pipe means it died in its current call."""
        try:
            while w.chunk and w.conn.poll():
                status, value, error = w.conn.recv()
                out[w.chunk[w.pos]] = Outcome(status, value, error)
                if status == ERROR:
                    self.stats.last_error = error
                w.pos += 1
                w.started = time.monotonic()
                if w.pos == len(w.chunk):
                    w.chunk = None
        except (EOFError, OSError):
            _stop(w.proc)
            self.stats.worker_deaths += 1
            self._finish_current(w, Outcome(ERROR, error=f"reward worker died (exit code {w.proc.returncode})"),
                                 out, pending)

    def _finish_current(self, w: _Worker, outcome: Outcome, out: list, pending: deque) -> None:
        """Give the running call `outcome`, requeue the rest of the chunk, and replace the worker."""
        out[w.chunk[w.pos]] = outcome
        if outcome.error:
            self.stats.last_error = outcome.error
        pending.extendleft(reversed(w.chunk[w.pos + 1:]))
        w.chunk = None
        self._replace(w)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if os.getpid() != self._pid:
            return
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, EOFError, OSError):
                pass
        for w in self._workers:
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
            _stop(w.proc)
            w.conn.close()
        self._workers = []


def _stop(proc: subprocess.Popen) -> None:
    """Kill `proc` if it still runs, and reap it."""
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # unkillable (stuck in the kernel): leave it to the OS
        pass


# ---------------------------------------------------------------------------------------------- sharing
_POOLS: dict[tuple, RewardPool] = {}


def shared_pool(timeout_s: float, num_workers: int, memory_mb: int = 0) -> RewardPool:
    """One pool per setting per process, started on first use and stopped at exit."""
    key = (float(timeout_s), int(num_workers), int(memory_mb))
    pool = _POOLS.get(key)
    if pool is None:
        pool = _POOLS[key] = RewardPool(timeout_s, num_workers, memory_mb)
    return pool


def _close_all() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    # A forked child (e.g. Megatron's checkpoint writers) must not talk to the parent's workers.
    os.register_at_fork(after_in_child=_POOLS.clear)


# ---------------------------------------------------------------------------------------------- scoring
Component = tuple[str, Callable[..., float], tuple]


def run_components(components: Sequence[Component]) -> dict[str, tuple[bool, Any, str]]:
    """In a worker: every component of one sample; name -> (ok, value, error). One failing does not stop
    the others."""
    out = {}
    for name, fn, args in components:
        try:
            out[name] = (True, fn(*args), "")
        except Exception as e:  # noqa: BLE001 (the component's failure, reported per component)
            out[name] = (False, None, f"{type(e).__name__}: {e}"[:300])
    return out


@dataclass
class SampleScores:
    """One sample's component values; `failed` maps a component that raised to its error; `timed_out` when the
    sample's grading overran the time limit (then `values` is empty) or its worker died."""

    values: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    timed_out: bool = False


def score_components(pool: RewardPool, per_sample: Sequence[Sequence[Component]]) -> list[SampleScores]:
    """Run each sample's components in one worker call, under the pool's time limit."""
    outcomes = pool.run([(run_components, (list(comps),)) for comps in per_sample])
    scores = []
    for comps, outcome in zip(per_sample, outcomes):
        s = SampleScores()
        if outcome.status == TIMEOUT:
            s.timed_out = True
        elif outcome.status == ERROR:  # the worker died: every component of the sample failed
            s.failed = {name: outcome.error for name, _, _ in comps}
        else:
            for name, (ok, value, error) in outcome.value.items():
                if ok:
                    s.values[name] = value
                else:
                    s.failed[name] = error
        scores.append(s)
    return scores
