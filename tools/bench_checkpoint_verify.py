#!/usr/bin/env python
"""Cost of checkpoint verification: writing the manifest at commit and checking it on load.

    python tools/bench_checkpoint_verify.py [--gib 2] [--files 8] [--write-docs]

Writes --gib GiB of random bytes in --files files (Megatron writes a few `.distcp` files per rank), then
times `write_manifest` (at commit: the files were just written, so they are in the page cache) and
`verify_checkpoint` (on load). Both read every byte once in 8 MiB chunks and hash on up to 8 threads, so the
figure is min(read bandwidth, SHA-256 throughput x threads). On a cold start (after a reboot) the read comes
from disk at the disk's bandwidth, the same bytes the load itself reads. With --write-docs a row is added
to docs/PERFORMANCE.md ("Checkpoint verification").
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SECTION = "## Checkpoint verification"
HEADER = ("| date | CPU (cores), load | commit | size | files | SHA-256 one stream GB/s | manifest at commit s (GB/s) "
          "| verify on load s (GB/s) |\n|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--dir", default=None, help="where to write the test files (default: a temporary folder)")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)

    from bench_rewards import _cpu

    from pebr_mega.run.stage_checkpoints import verify_checkpoint, write_manifest

    size = int(args.gib * 2**30)
    block = os.urandom(64 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(block).digest()
    stream = len(block) / (time.perf_counter() - t0) / 1e9
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        root = Path(d)
        per_file = size // args.files
        for i in range(args.files):
            with (root / f"__{i}_0.distcp").open("wb") as f:
                left = per_file
                while left > 0:
                    n = min(left, len(block))
                    f.write(block[:n])
                    left -= n
        t0 = time.perf_counter()
        write_manifest(root)
        commit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert verify_checkpoint(root) is None
        verify_s = time.perf_counter() - t0
    gb = per_file * args.files / 1e9
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = f"{_cpu()} ({os.cpu_count()}), load {load:.1f}"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    row = (f"| {dt.date.today().isoformat()} | {cpu} | {commit} | {gb:.2f} GB | {args.files} | {stream:.2f} | "
           f"{commit_s:.2f} ({gb / commit_s:.2f}) | {verify_s:.2f} ({gb / verify_s:.2f}) |")
    print(HEADER.splitlines()[0])
    print(row)
    if args.write_docs:
        from perf_docs import add_table_row

        add_table_row(ROOT / "docs" / "PERFORMANCE.md", SECTION, HEADER, row)
        print(f"added a row to docs/PERFORMANCE.md ({SECTION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
