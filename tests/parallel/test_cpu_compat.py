"""The CPU compatibility layer is scoped: in force inside `megatron_on_cpu` (and the functions it decorates),
gone after, so code outside Megatron calls never runs with CUDA device arguments mapped to CPU."""
from __future__ import annotations

import pytest
import torch

from pebr_mega.parallel.cpu_compat import cpu_compat_active, megatron_on_cpu

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op with CUDA")


def _cuda_zeros():
    return torch.zeros(2, device="cuda")


def test_the_layer_is_in_force_only_inside_and_everything_is_restored():
    from megatron.core.tensor_parallel import random as mrandom

    current_device, tracker = torch.cuda.current_device, mrandom._CUDA_RNG_STATE_TRACKER
    modes = torch._C._len_torch_function_stack()
    with pytest.raises((RuntimeError, AssertionError)):
        _cuda_zeros()
    with megatron_on_cpu:
        assert cpu_compat_active() and _cuda_zeros().device.type == "cpu" and torch.cuda.current_device() == torch.device("cpu")
        with megatron_on_cpu:  # re-entrant: the inner exit keeps the outer scope in force
            pass
        assert _cuda_zeros().device.type == "cpu"
        assert mrandom._CUDA_RNG_STATE_TRACKER is not tracker
    assert not cpu_compat_active()
    assert torch.cuda.current_device is current_device and mrandom._CUDA_RNG_STATE_TRACKER is tracker
    assert torch._C._len_torch_function_stack() == modes
    with pytest.raises((RuntimeError, AssertionError)):
        _cuda_zeros()


def test_a_decorated_function_runs_inside_and_an_exception_still_exits():
    @megatron_on_cpu
    def build():
        assert cpu_compat_active()
        raise ValueError("boom")

    with pytest.raises(ValueError):
        build()
    assert not cpu_compat_active()
