"""Launch a function on N local ranks (torch.multiprocessing, spawn) and collect what each returns.

Used by `pebr compare-logits` and the multi-rank tests: each child gets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT (a free port) in its environment, runs `fn(rank, *args)`, and sends back its
result. Tensors in results are converted to numpy arrays in the child, so nothing depends on shared memory
outliving a child process. A child's exception is re-raised in the parent with the child's traceback.
"""
from __future__ import annotations

import os
import queue
import socket
import traceback
from typing import Any, Callable

from pebr_mega.parallel.cpu_compat import enable_cpu_compat


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy() if obj.dtype != torch.bfloat16 else obj.detach().float().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _child(rank: int, fn: Callable, world: int, port: int, results, args: tuple, env: dict,
           megatron_only: bool) -> None:
    os.environ.update(env)
    if megatron_only:
        enable_cpu_compat()  # a rank that runs only Megatron keeps the CPU layer for its whole life
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        out = fn(rank, *args)
        results.put((rank, True, _plain(out)))
    except BaseException:  # report every failure, including SystemExit from a library
        results.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerError(RuntimeError):
    """A spawned rank raised; the message carries that rank's traceback."""


def spawn(fn: Callable, world_size: int, *args: Any, env: dict | None = None, timeout_s: float = 1800,
          megatron_only: bool = True) -> list:
    """Run `fn(rank, *args)` on `world_size` spawned processes; return the per-rank results in rank order.

    `fn` must be importable (a module-level function). `env` is added to each child's environment. A
    `megatron_only` rank (one that calls Megatron directly) enters the CPU compatibility layer for its whole
    life; pass False for a rank that runs the trainers, whose Megatron calls enter it themselves.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(_child, args=(fn, world_size, free_port(), results, args, dict(env or {}), megatron_only),
                               nprocs=world_size, join=False, start_method="spawn")
    got: dict[int, Any] = {}
    import time

    deadline = time.monotonic() + timeout_s
    while len(got) < world_size:
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            if time.monotonic() > deadline:
                _kill(procs)
                raise WorkerError(f"spawned ranks did not finish within {timeout_s:.0f} s")
            dead = [p for p in procs.processes if p.exitcode not in (None, 0)]
            if dead:
                _kill(procs)
                raise WorkerError(f"a spawned rank died with exit code {dead[0].exitcode} without reporting")
            continue
        if not ok:
            _kill(procs)
            raise WorkerError(f"rank {rank} failed:\n{value}")
        got[rank] = value
    while not procs.join():
        pass
    return [got[r] for r in range(world_size)]


def _kill(procs) -> None:
    for p in procs.processes:
        if p.is_alive():
            p.terminate()
    for p in procs.processes:
        p.join(5)
