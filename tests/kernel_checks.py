"""Checks shared by the kernel tests: the interpreter ones (CPU) and the compiled ones (CUDA)."""
from __future__ import annotations

import importlib
import os

import torch

from pebr_mega.kernels import ops as kernels
from pebr_mega.kernels.reference import logprobs_reference


def check_logprobs_against_reference(x: torch.Tensor, ids: torch.Tensor, temperature: float, seed: int,
                                     use_logp: bool = True, use_ent: bool = True) -> None:
    """`kernels.logprobs` on `x`'s device: values and the gradient of sum(a * logp + b * entropy) against
    float64 autograd of the torch reference, with random weights a, b."""
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(len(ids), generator=g, dtype=torch.float64).to(x.device) for _ in range(2))
    xk = x.clone().requires_grad_()
    logp, ent = kernels.logprobs(xk, ids, temperature, return_entropy=True)
    xr = x.double().requires_grad_()
    logp_ref, ent_ref = logprobs_reference(xr, ids, temperature, return_entropy=True)
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == ent.shape == ids.shape
    # float32 resolves z = x / T to ~6e-8 relative, so allow that much of the row's largest |z|.
    scale = x.float().masked_fill(x.isinf(), 0).abs().amax(-1).double() / temperature
    for got, want in ((logp, logp_ref), (ent, ent_ref)):
        err = (got.double() - want.detach()).abs()
        assert (err <= 2e-5 + 4e-7 * scale).all(), f"max error {err.max().item()}"
    loss = (a * logp.double()).sum() * use_logp + (b * ent.double()).sum() * use_ent
    loss_ref = (a * logp_ref).sum() * use_logp + (b * ent_ref).sum() * use_ent
    loss.backward()
    loss_ref.backward()
    assert xk.grad.dtype == x.dtype and torch.isfinite(xk.grad).all()
    tol = dict(rtol=1e-2, atol=2e-3) if x.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(xk.grad.double(), xr.grad, **tol)


def enable_interpreter(module_name: str, constant: str, value: int):
    """Set TRITON_INTERPRET=1, (re)import the kernel module under it, set its block constant.

    Returns (module, undo) where undo restores the environment and the constant."""
    old_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.import_module(module_name)
    kernel_types = {type(v).__name__ for v in vars(module).values()}
    if "InterpretedFunction" not in kernel_types:  # imported earlier without the interpreter
        module = importlib.reload(module)
    old_value = getattr(module, constant)
    setattr(module, constant, value)

    def undo() -> None:
        setattr(module, constant, old_value)
        if old_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old_env

    return module, undo
