"""Benchmark the fused kernels against torch eager and Liger on one NVIDIA GPU.

    python tools/bench_kernels.py                  # full sizes (H100/H200): N=16,384 x V=152,064 logits, ...
    python tools/bench_kernels.py --size small     # a quick smoke run
    python tools/bench_kernels.py --write-docs     # also append the results to docs/PERFORMANCE.md

Each row is a `triton.testing.do_bench` median and the peak memory allocated on top of the inputs during
one call (outputs included: a forward+backward from logits must produce an [N, V] gradient). The floors
come from this run's own measurements: device-to-device copy bandwidth (bytes read + written) and the bf16
matmul rate, so rows compare against the card they ran on. A correctness column gives the largest
difference from torch eager on the same inputs. Not a test: nothing here fails on a slow number.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"

SIZES = {
    # logits benchmark (n x v), hidden-state benchmark (hn x h -> hv), GRPO loss tokens (rows x cols)
    "full": dict(n=16_384, v=152_064, hn=8_192, h=3_584, hv=152_064, loss_rows=512, loss_cols=2_048, mm=8_192),
    "small": dict(n=1_024, v=32_768, hn=1_024, h=1_024, hv=32_768, loss_rows=64, loss_cols=1_024, mm=4_096),
}


@dataclass
class Row:
    bench: str
    method: str
    mode: str
    ms: float | None = None
    extra_gb: float | None = None
    achieved: str = ""
    floor_pct: str = ""
    check: str = ""
    note: str = ""


def import_kernels():
    """`pebr_mega.kernels.ops` from this checkout (`pebr_mega/kernels` links to the top-level `kernels/`)."""
    sys.path.insert(0, str(ROOT))
    from pebr_mega.kernels import ops

    return ops


def liger():
    """Liger-Kernel's loss classes, or None when the package is not installed."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss


def measure(fn: Callable[[], object]) -> tuple[float, float]:
    """(median ms, peak extra GB of one call) of ``fn`` on the current CUDA device."""
    import triton.testing

    out = fn()  # compile / warm up
    del out
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 1e9
    del out
    ms = triton.testing.do_bench(fn, return_mode="median")
    gc.collect()
    torch.cuda.empty_cache()
    return ms, extra


def copy_bandwidth(n_bytes: int) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    import triton.testing

    src = torch.empty(n_bytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * n_bytes / (ms * 1e-3)


def matmul_rate(n: int) -> float:
    """bf16 n^3 matmul rate in FLOP/s."""
    import triton.testing

    a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max|d|={(a.float() - b.float()).abs().max().item():.1e}"


def bandwidth_row(row: Row, n_bytes: float, copy_bw: float) -> Row:
    """Fill achieved GB/s (for ``n_bytes``, the minimum traffic) and the share of the copy-bandwidth floor."""
    seconds = row.ms * 1e-3
    row.achieved = f"{n_bytes / seconds / 1e9:,.0f} GB/s"
    row.floor_pct = f"{100 * (n_bytes / copy_bw) / seconds:.0f}%"
    return row


def bench_logprobs(k, size: dict, copy_bw: float, rows: list[Row]) -> dict:
    n, v = size["n"], size["v"]
    name = f"logprobs N={n:,} V={v:,} bf16"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(n, v, device=DEVICE, dtype=torch.bfloat16, generator=gen) * 2).requires_grad_()
    ids = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    w1, w2 = torch.randn(n, device=DEVICE, generator=gen), torch.randn(n, device=DEVICE, generator=gen)
    logits_bytes = n * v * logits.element_size()

    def torch_fwd(entropy: bool):
        logp_all = torch.log_softmax(logits.float(), dim=-1)
        logp = logp_all.gather(-1, ids[:, None]).squeeze(-1)
        return logp, (-(logp_all.exp() * logp_all).sum(-1) if entropy else None)

    def ours_fwd(entropy: bool, x=None):
        return k.logprobs(logits if x is None else x, ids, return_entropy=entropy)

    def fwd_bwd(forward, entropy: bool):
        def run():
            logp, ent = forward(entropy)
            loss = (logp * w1).sum() + ((ent * w2).sum() if entropy else 0)
            return torch.autograd.grad(loss, logits)[0]
        return run

    found = {}
    with torch.no_grad():
        ref = torch_fwd(True)
        got = ours_fwd(True)
    checks = {True: f"{max_diff(got[0], ref[0])} ent {max_diff(got[1], ref[1])}", False: max_diff(got[0], ref[0])}
    del ref, got
    for entropy in (False, True):
        label = name + (" + entropy" if entropy else "")
        for method, forward in (("torch eager", torch_fwd), ("ours", ours_fwd)):
            with torch.no_grad():
                ms, gb = measure(lambda: forward(entropy))
            rows.append(bandwidth_row(Row(label, method, "fwd", ms, gb,
                                          check=checks[entropy] if method == "ours" else ""), logits_bytes, copy_bw))
            found[(entropy, method, "fwd")] = rows[-1]
            ms, gb = measure(fwd_bwd(forward, entropy))
            rows.append(bandwidth_row(Row(label, method, "fwd+bwd", ms, gb), 3 * logits_bytes, copy_bw))
            found[(entropy, method, "fwd+bwd")] = rows[-1]

        def inplace():
            # A fresh non-leaf copy stands in for the lm_head output (whose storage the gradient may reuse);
            # clone's backward passes the gradient through without copying it.
            x = logits.clone()
            logp, ent = k.logprobs(x, ids, return_entropy=entropy, inplace_backward=True)
            loss = (logp * w1).sum() + ((ent * w2).sum() if entropy else 0)
            return torch.autograd.grad(loss, logits)[0]

        ms, gb = measure(inplace)
        rows.append(bandwidth_row(Row(label, "ours, in-place grad", "fwd+bwd", ms, gb,
                                      note="time and memory include one clone of the logits per call"),
                                  3 * logits_bytes, copy_bw))
    lib = liger()
    if lib is None:
        rows.append(Row(name, "liger-kernel", "-", note="not installed (pip install liger-kernel)"))
    else:
        ce = lib[0](reduction="sum")
        # Liger writes its gradient over the logits inside forward: give it its own copy.
        x = logits.detach().clone().requires_grad_()
        with torch.no_grad():
            ms, gb = measure(lambda: ce(x.detach(), ids))
        rows.append(bandwidth_row(Row(name, "liger-kernel CE", "fwd", ms, gb, note="-log p, no entropy"),
                                  logits_bytes, copy_bw))
        ms, gb = measure(lambda: torch.autograd.grad(ce(x, ids), x)[0])
        rows.append(bandwidth_row(Row(name, "liger-kernel CE", "fwd+bwd", ms, gb,
                                      note="gradient computed in forward, in place over the logits"),
                                  3 * logits_bytes, copy_bw))
    return found


def bench_linear(k, size: dict, mm_rate: float, rows: list[Row]) -> dict:
    n, h, v = size["hn"], size["h"], size["hv"]
    name = f"linear logprobs N={n:,} H={h:,} V={v:,} bf16"
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = torch.randn(n, h, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, device=DEVICE, dtype=torch.bfloat16, generator=gen) * 0.02).requires_grad_()
    ids = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    w = torch.randn(n, device=DEVICE, generator=gen)
    flops = {"fwd": 2 * n * h * v, "fwd+bwd": 6 * n * h * v}

    def torch_fwd():
        logits = hidden @ weight.T
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, None]).squeeze(-1)

    def ours_fwd():
        return k.linear_logprobs(hidden, weight, ids)[0]

    def flop_row(row: Row) -> Row:
        seconds = row.ms * 1e-3
        row.achieved = f"{flops[row.mode] / seconds / 1e12:,.0f} TFLOP/s"
        row.floor_pct = f"{100 * flops[row.mode] / mm_rate / seconds:.0f}%"
        return row

    with torch.no_grad():
        check = max_diff(ours_fwd(), torch_fwd())
    found = {}
    for method, forward in (("torch eager", torch_fwd), ("ours", ours_fwd)):
        with torch.no_grad():
            ms, gb = measure(forward)
        rows.append(flop_row(Row(name, method, "fwd", ms, gb, check=check if method == "ours" else "")))
        found[(method, "fwd")] = rows[-1]
        ms, gb = measure(lambda: torch.autograd.grad((forward() * w).sum(), (hidden, weight)))
        rows.append(flop_row(Row(name, method, "fwd+bwd", ms, gb,
                                 note="8NHV FLOPs run (recompute), 6NHV counted" if method == "ours" else "")))
        found[(method, "fwd+bwd")] = rows[-1]
    lib = liger()
    if lib is None:
        rows.append(Row(name, "liger-kernel", "-", note="not installed (pip install liger-kernel)"))
    else:
        flce = lib[1](reduction="sum")
        ms, gb = measure(lambda: torch.autograd.grad(flce(weight, hidden, ids), (hidden, weight)))
        rows.append(flop_row(Row(name, "liger-kernel FLCE", "fwd+bwd", ms, gb, note="CE loss, gradients in forward")))
    return found


def bench_grpo_loss(k, size: dict, copy_bw: float, rows: list[Row]) -> Row:
    from pebr_mega.kernels.reference import grpo_loss_reference

    b, t = size["loss_rows"], size["loss_cols"]
    name = f"GRPO loss {b * t:,} tokens ({b}x{t}) fp32"
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    lp = (-torch.rand(b, t, device=DEVICE, generator=gen) * 3).requires_grad_()
    old = lp.detach() + torch.randn(b, t, device=DEVICE, generator=gen) * 0.3
    ref = lp.detach() + torch.randn(b, t, device=DEVICE, generator=gen) * 0.3
    adv = torch.randn(b, 1, device=DEVICE, generator=gen).expand(b, t).contiguous()
    mask = torch.rand(b, t, device=DEVICE, generator=gen) < 0.8
    # minimum traffic: read 4 fp32 tensors and a bool mask once, write the fp32 gradient once
    floor_bytes = b * t * (4 * 4 + 1 + 4)
    ours_loss, _ = k.grpo_loss(lp, old, adv, mask, ref)
    torch_loss, _ = grpo_loss_reference(lp, old, adv, mask, ref)
    check = max_diff(ours_loss, torch_loss)
    result = None
    for method, fn in (("torch eager (algo.grpo)", grpo_loss_reference), ("ours", k.grpo_loss)):
        ms, gb = measure(lambda: torch.autograd.grad(fn(lp, old, adv, mask, ref)[0], lp)[0])
        rows.append(bandwidth_row(Row(name, method, "fwd+bwd", ms, gb, check=check if method == "ours" else ""),
                                  floor_bytes, copy_bw))
        result = rows[-1]
    return result


def sweep_blocks(k, size: dict, copy_bw: float) -> list[Row]:
    """Our log-probs + entropy forward and forward+backward at several (BLOCK_V, warps) settings."""
    import importlib

    fused = importlib.import_module("pebr_mega.kernels._logprobs_triton")
    n, v = size["n"], size["v"]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(n, v, device=DEVICE, dtype=torch.bfloat16, generator=gen) * 2).requires_grad_()
    ids = torch.randint(0, v, (n,), device=DEVICE, generator=gen)
    w = torch.randn(n, device=DEVICE, generator=gen)
    logits_bytes = n * v * logits.element_size()
    saved = fused.MAX_BLOCK_V, fused.NUM_WARPS
    rows = []
    try:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                fused.MAX_BLOCK_V, fused.NUM_WARPS = block, warps
                label = f"sweep BLOCK_V={block} warps={warps}"
                with torch.no_grad():
                    ms, gb = measure(lambda: k.logprobs(logits, ids, return_entropy=True))
                rows.append(bandwidth_row(Row(label, "ours", "fwd", ms, gb), logits_bytes, copy_bw))

                def fwd_bwd():
                    logp, ent = k.logprobs(logits, ids, return_entropy=True)
                    return torch.autograd.grad((logp * w).sum() + (ent * w).sum(), logits)[0]

                ms, gb = measure(fwd_bwd)
                rows.append(bandwidth_row(Row(label, "ours", "fwd+bwd", ms, gb), 3 * logits_bytes, copy_bw))
    finally:
        fused.MAX_BLOCK_V, fused.NUM_WARPS = saved
    return rows


def targets(size_name: str, logprobs: dict, linear: dict, loss: Row) -> list[str]:
    """The issue's targets, each with the measured figure and met / NOT met."""
    out = []
    ent_fwd, ent_fb = logprobs[(True, "ours", "fwd")], logprobs[(True, "ours", "fwd+bwd")]
    pct = float(ent_fwd.floor_pct.rstrip("%"))
    verdict = "met" if pct >= 85 else "NOT met"
    out.append(f"log-probs+entropy fwd >= 85% of copy-bandwidth floor: {pct:.0f}% -> {verdict}")
    ratio = ent_fb.ms / ent_fwd.ms
    out.append(f"log-probs+entropy fwd+bwd <= 3x fwd: {ratio:.2f}x -> {'met' if ratio <= 3 else 'NOT met'}")
    out.append(f"log-probs+entropy fwd extra memory ~0 (no [N,V] buffer): {ent_fwd.extra_gb:.3f} GB")
    pct = float(loss.floor_pct.rstrip("%"))
    out.append(f"GRPO loss fwd+bwd >= 70% of copy bandwidth: {pct:.0f}% -> {'met' if pct >= 70 else 'NOT met'}")
    lin = linear[("ours", "fwd+bwd")]
    if size_name == "full":
        ok = lin.ms <= 45 and lin.extra_gb <= 2
        grads_gb = (SIZES["full"]["hv"] + SIZES["full"]["hn"]) * SIZES["full"]["h"] * 2 / 1e9
        out.append(f"hidden-state fwd+bwd <= 45 ms and <= 2 GB extra: {lin.ms:.1f} ms, {lin.extra_gb:.2f} GB -> "
                   f"{'met' if ok else 'NOT met'} (the extra includes the bf16 gradients of weight and hidden, "
                   f"{grads_gb:.2f} GB)")
    return out


def format_table(rows: list[Row]) -> str:
    head = "| benchmark | method | pass | median ms | peak extra GB | achieved | of floor | check | note |"
    lines = [head, "| " + " | ".join("---" for _ in range(9)) + " |"]
    for r in rows:
        ms = f"{r.ms:.3f}" if r.ms is not None else "-"
        gb = f"{r.extra_gb:.2f}" if r.extra_gb is not None else "-"
        lines.append(f"| {r.bench} | {r.method} | {r.mode} | {ms} | {gb} | {r.achieved} | {r.floor_pct} | "
                     f"{r.check} | {r.note} |")
    return "\n".join(lines)


def versions() -> str:
    import triton

    lib = "not installed"
    try:
        import importlib.metadata

        lib = importlib.metadata.version("liger-kernel")
    except Exception:
        pass
    return f"torch {torch.__version__}, triton {triton.__version__}, liger-kernel {lib}"


def write_docs(text: str) -> Path:
    """Append `text` to the Kernels section of docs/PERFORMANCE.md."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from perf_docs import append_to_section

    return append_to_section(ROOT / "docs" / "PERFORMANCE.md", "## Kernels", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="full: the issue's sizes; small: smoke")
    parser.add_argument("--write-docs", action="store_true", help="append the results to docs/PERFORMANCE.md")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the log-prob kernel at several BLOCK_V / warps settings")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device on this machine; these benchmarks need an NVIDIA GPU "
              "(H100/H200 for the full sizes). Nothing was measured.", file=sys.stderr)
        return 2
    k = import_kernels()
    size = SIZES[args.size]
    copy_bw = copy_bandwidth(1 << 30 if args.size == "full" else 1 << 28)
    mm = matmul_rate(size["mm"])
    print(f"{torch.cuda.get_device_name()}: copy {copy_bw / 1e12:.2f} TB/s (read+write), "
          f"bf16 matmul {mm / 1e12:.0f} TFLOP/s; {versions()}", flush=True)
    rows: list[Row] = []
    logprobs = bench_logprobs(k, size, copy_bw, rows)
    linear = bench_linear(k, size, mm, rows)
    loss = bench_grpo_loss(k, size, copy_bw, rows)
    if args.sweep:
        rows += sweep_blocks(k, size, copy_bw)
    table = format_table(rows)
    goals = targets(args.size, logprobs, linear, loss)
    print(table)
    print("\n".join(goals))
    if args.write_docs:
        command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
        text = "\n".join([
            f"### {torch.cuda.get_device_name()}, {datetime.date.today().isoformat()}, size {args.size}",
            "",
            f"`{command}`; {versions()}.",
            f"Measured in the same run: copy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write), "
            f"bf16 {size['mm']}^3 matmul {mm / 1e12:.0f} TFLOP/s. Floors: logits read once (fwd) or read twice and "
            "written once (fwd+bwd) at copy bandwidth; 6NHV FLOPs at the matmul rate; GRPO loss inputs read once "
            "and the gradient written once.",
            "",
            table,
            "",
            *[f"- {g}" for g in goals],
        ])
        print(f"appended to {write_docs(text)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
