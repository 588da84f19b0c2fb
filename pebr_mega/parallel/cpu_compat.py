"""The narrow CPU compatibility layer that lets Megatron-Core run on CPU over gloo.

WHY this exists: Megatron-Core 0.16 assumes CUDA in a handful of places that are not about the math:
`torch.cuda.current_device()` as the device of new tensors (rotary `inv_freq`, pipeline shape buffers,
`device="cuda"` counters in the schedules), `torch.cuda.synchronize()` after p2p sends, and the CUDA RNG
tracker (`torch.cuda.get_rng_state()`) used by TP-region dropout and activation recompute. Tests and the
embedded CPU demo run the very same Megatron model on CPU, so instead of forking Megatron we:

1. patch `torch.cuda.current_device` (-> the CPU device) and `torch.cuda.synchronize` (-> no-op); the CPU
   device rather than GPU index 0, because some allocations happen inside autograd Functions' backward
   (Megatron's sequence-parallel all-gather, `tensor_parallel/mappings.py::_gather_along_first_dim`), where the
   function mode below is not in force and a bare 0 would name a GPU;
2. install a `torch.overrides.TorchFunctionMode` that rewrites any CUDA device argument (`"cuda"`,
   `"cuda:0"`, `torch.device("cuda")`, a bare GPU index) to CPU, and turns `Tensor.cuda()` into a no-op;
3. replace the CUDA RNG tracker by one that tracks *CPU* generator states (on CPU the CPU generator is
   the one dropout draws from, so forking it is the faithful translation), and point Megatron's
   `_get/_set_cuda_rng_state` (used by activation recompute) at the CPU generator.

Attention masks: Megatron's local core attention builds its default causal mask on CUDA; our model passes
an explicit mask where that path is used (see `pebr_mega.models.specs`), so nothing is patched for it.

The layer is SCOPED: `megatron_on_cpu` is a re-entrant context manager (and decorator) entered only around
Megatron calls (process groups, building the model, forward/backward through the schedules, optimizer
steps, distributed-checkpoint save/load: the actor's public methods, `init_parallel`, checkpoint conversion)
and exited after them, restoring `torch.cuda`, the function-mode stack and Megatron's RNG globals. Code
between those calls (transformers' `generate`, rewards, data) runs on plain torch, so nothing depends on
whether a Megatron call happened earlier in the process. The CPU RNG tracker keeps its streams across
entries. A process that does nothing but Megatron work (a spawned test rank, a `compare-logits` rank) may
call `enable_cpu_compat()`, which enters it for the rest of the process. With CUDA present every entry is a
no-op.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_DEPTH = 0  # nesting depth of `megatron_on_cpu` in this process
_SAVED: dict[str, Any] = {}  # what entering replaced, restored on the outermost exit
_TRACKER = None  # the CPU RNG tracker: created once, its streams survive exits and re-entries


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int is how Megatron passes `torch.cuda.current_device()`: an index into the GPUs.
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of torch calls to CPU (Megatron allocates buffers on 'cuda')."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        dev = kwargs.get("device")
        if dev is not None and _is_cuda_device(dev):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's named RNG-state tracker, keeping CPU generator states instead of CUDA ones."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def _enter() -> None:
    global _DEPTH, _TRACKER
    _DEPTH += 1
    if _DEPTH > 1:
        return
    from megatron.core.tensor_parallel import random as mrandom

    if _TRACKER is None:
        _TRACKER = _cpu_rng_tracker_class()()
    _SAVED.update(current_device=torch.cuda.current_device, synchronize=torch.cuda.synchronize,
                  tracker=mrandom._CUDA_RNG_STATE_TRACKER, initialized=mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED,
                  get_state=mrandom._get_cuda_rng_state, set_state=mrandom._set_cuda_rng_state, mode=_CudaToCpuMode())
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    mrandom._CUDA_RNG_STATE_TRACKER = _TRACKER
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves/restores "the CUDA RNG state"; on CPU that is the CPU generator.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    _SAVED["mode"].__enter__()


def _exit() -> None:
    global _DEPTH
    _DEPTH -= 1
    if _DEPTH > 0:
        return
    from megatron.core.tensor_parallel import random as mrandom

    _SAVED["mode"].__exit__(None, None, None)
    torch.cuda.current_device = _SAVED["current_device"]
    torch.cuda.synchronize = _SAVED["synchronize"]
    mrandom._CUDA_RNG_STATE_TRACKER = _SAVED["tracker"]
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = _SAVED["initialized"]
    mrandom._get_cuda_rng_state = _SAVED["get_state"]
    mrandom._set_cuda_rng_state = _SAVED["set_state"]
    _SAVED.clear()


class _MegatronOnCpu(contextlib.ContextDecorator):
    """`with megatron_on_cpu:` / `@megatron_on_cpu`: Megatron's CUDA assumptions mapped to CPU inside, only
    when CUDA is absent; re-entrant; everything restored on the outermost exit."""

    def __enter__(self) -> "_MegatronOnCpu":
        if not torch.cuda.is_available():
            _enter()
        return self

    def __exit__(self, *exc) -> bool:
        if not torch.cuda.is_available():
            _exit()
        return False


megatron_on_cpu = _MegatronOnCpu()


def cpu_compat_active() -> bool:
    """Whether the CPU compatibility layer is in force right now."""
    return _DEPTH > 0


def enable_cpu_compat() -> bool:
    """Enter the layer for the rest of this process (a process that runs only Megatron); returns whether it
    is active (False with CUDA). Idempotent."""
    if torch.cuda.is_available():
        return False
    if not getattr(enable_cpu_compat, "_entered", False):
        megatron_on_cpu.__enter__()
        enable_cpu_compat._entered = True
    return True


def seed_model_parallel_rng(seed: int) -> None:
    """Seed Megatron's tracked RNG streams (`model_parallel_cuda_manual_seed`) on CPU or GPU."""
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        return
    from megatron.core.parallel_state import get_tensor_model_parallel_rank
    from megatron.core.tensor_parallel import random as mrandom

    with megatron_on_cpu:
        # The same streams and seed offsets as Megatron's model_parallel_cuda_manual_seed.
        _TRACKER.reset()
        _TRACKER.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
        _TRACKER.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + get_tensor_model_parallel_rank())
        _TRACKER.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)
