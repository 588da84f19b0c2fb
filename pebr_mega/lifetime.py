"""Child processes die with the process that started them, also when it is SIGKILLed.

A SIGKILLed trainer runs no clean-up, so any helper process it started that does not notice on its own
outlives it. Two kinds are started here:

- the reward workers (`pebr_mega.rewards.guard`), which may be busy in a computation that never returns
  (they call `die_with_parent` first thing; they are started with `subprocess`, so there is no fork server
  or resource tracker of theirs to leave behind);
- Megatron-Core's checkpoint-writer results queue. megatron-core 0.16's
  `dist_checkpointing/strategies/filesystem_async.py::_get_write_results_queue` creates it on the first save
  with `mp.get_context("spawn").Manager().Queue()`: a manager server process (a fresh interpreter that
  re-imports the main module, ~270 MB with torch) that nothing stops when the trainer is killed, and which
  keeps the `multiprocessing` resource tracker alive with it. `install_checkpoint_writer_queue` creates that
  manager ourselves, with `die_with_parent` as its initializer, and hands Megatron its queue, before Megatron
  would create its own.

On Linux `die_with_parent` asks the kernel (prctl PR_SET_PDEATHSIG) to SIGKILL the calling process when the
thread that created it exits; a signal works even when the child is stuck in a C call that holds the GIL (a
huge integer power), where a watchdog thread could not run. Elsewhere a daemon thread polls the parent id.
The resource tracker needs nothing: it exits when the last process holding its pipe (the trainer and the
manager) is gone.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_manager = None  # the manager serving Megatron's results queue, kept alive for the life of the process


def die_with_parent() -> None:
    """Make the calling process exit when its parent exits (call it first thing in a child process)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def install_checkpoint_writer_queue() -> bool:
    """Give Megatron's checkpoint writer a results queue whose manager process dies with this process.

    Idempotent; returns False (and changes nothing) when this megatron-core version has no such queue or it
    already exists. Must be called from the main thread (PR_SET_PDEATHSIG follows the creating thread).
    """
    global _manager
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return False
    if not hasattr(filesystem_async, "_results_queue") or filesystem_async._results_queue is not None:
        return False
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    # The same start method Megatron uses: the queue is handed to spawned async writers when async save is on.
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent)
    _manager = manager
    filesystem_async._results_queue = manager.Queue()
    return True
