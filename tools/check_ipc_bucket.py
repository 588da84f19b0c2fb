"""One weight bucket through CUDA IPC to a spawned process, as SGLang's colocated weight update moves it.

    python tools/check_ipc_bucket.py [--mb 256] [--tensors 8]

The trainer side of `rollout/sglang_engine.py::update_weights` hands SGLang CUDA tensors; SGLang serialises
them per TP rank with `MultiprocessingSerializer.serialize`, a `ForkingPickler` dump (CUDA tensors become IPC
handles; sglang/srt/utils/common.py, 0.5.13 and 0.5.23), and its scheduler process rebuilds them. This
script does that round trip with SGLang's serializer when sglang imports, else with the same
`ForkingPickler` dump it wraps (the line printed says which), and checks:

1. the consumer reads the producer's values (checksums agree);
2. after the consumer drops its tensors and the producer drops the bucket, `torch.cuda.ipc_collect()` and
   `empty_cache()` give the memory back: allocated and reserved return to the baseline (the blocks of a
   shared tensor wait in torch's IPC limbo until the consumer's reference is gone: torch/csrc/CudaIPCTypes.cpp).

Exit status 0 when both hold; one table line per check. Needs CUDA.
"""
from __future__ import annotations

import argparse
import io
import sys

import torch
import torch.multiprocessing as mp


def serializer():
    """(name, serialize, deserialize): SGLang's MultiprocessingSerializer, or the ForkingPickler dump it is."""
    try:
        from sglang.srt.utils.common import MultiprocessingSerializer

        return "sglang MultiprocessingSerializer", MultiprocessingSerializer.serialize, MultiprocessingSerializer.deserialize
    except Exception:  # sglang absent (its wheel and dependencies exceed one call's carry)
        import pickle
        from multiprocessing.reduction import ForkingPickler

        def dump(obj) -> bytes:
            buf = io.BytesIO()
            ForkingPickler(buf).dump(obj)
            return buf.getvalue()

        return "ForkingPickler (what MultiprocessingSerializer.serialize runs)", dump, pickle.loads


def consumer(conn) -> None:
    """Rebuild the bucket from its IPC handles, checksum it, drop it, answer; then wait to be told to exit."""
    _, _, load = serializer()
    named = load(conn.recv())
    sums = [float(t.double().sum()) for _, t in named]
    devices = sorted({str(t.device) for _, t in named})
    del named
    torch.cuda.synchronize()
    conn.send((sums, devices))
    conn.recv()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=256, help="bucket size in MiB")
    p.add_argument("--tensors", type=int, default=8)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_ipc_bucket: needs CUDA")
        return 2
    name, dump, _ = serializer()
    torch.cuda.init()
    base_alloc, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    numel = (args.mb << 20) // 2 // args.tensors
    gen = torch.Generator(device="cuda").manual_seed(0)
    bucket = [(f"w{i}", torch.randn(numel, device="cuda", dtype=torch.bfloat16, generator=gen)) for i in range(args.tensors)]
    want = [float(t.double().sum()) for _, t in bucket]
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=consumer, args=(theirs,))
    proc.start()
    mine.send(dump(bucket))
    got, devices = mine.recv()
    del bucket
    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
    torch.cuda.empty_cache()
    after_alloc, after_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    mine.send("exit")
    proc.join(60)
    checks = [("values read by the consumer", got == want, f"{len(got)} tensors on {devices}"),
              ("allocated back to baseline", after_alloc == base_alloc, f"{base_alloc} -> {after_alloc} B"),
              ("reserved back to baseline", after_reserved <= base_reserved, f"{base_reserved} -> {after_reserved} B"),
              ("consumer exited", proc.exitcode == 0, f"exit code {proc.exitcode}")]
    print(f"| check ({name}, {args.mb} MiB in {args.tensors} bf16 tensors, {torch.cuda.get_device_name()}) | ok | detail |")
    print("| --- | --- | --- |")
    for what, ok, detail in checks:
        print(f"| {what} | {'yes' if ok else 'NO'} | {detail} |")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
