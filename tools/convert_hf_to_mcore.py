#!/usr/bin/env python
"""Convert an HF Qwen2.5-VL directory into a Megatron distributed checkpoint (loads at any TP/PP).

    python tools/convert_hf_to_mcore.py --hf-dir DIR --out DIR [--overwrite] [--skip-verify]

Runs on CPU (one process); the output also records the HF config and non-weight files, so
tools/export_to_hf.py needs no template, and a MANIFEST.json that its readers check. An HF directory pebr
exported is checked against its own MANIFEST.json first (--skip-verify reads it anyway). A non-empty --out is
replaced only with --overwrite, and never when it is, holds or lies inside the source; one conversion at a time
writes an --out. Bad input, and an OS error (no space, read-only, permission), is reported as one line and exit
status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output checkpoint directory: written beside it, then renamed into "
                   "place; must not be or hold the source")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    p.add_argument("--skip-verify", action="store_true",
                   help="convert even when --hf-dir does not match its MANIFEST.json (forensics)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    import warnings

    # Megatron warns at import about optional accelerators (Apex, TE) and deprecations: noise for a CLI tool.
    warnings.filterwarnings("ignore", module=r"megatron\.")
    from pebr_mega.checkpoint.convert import convert_hf_to_mcore
    from pebr_mega.errors import PebrError, describe_os_error
    from pebr_mega.outputs import lock_beside

    try:
        with lock_beside(args.out, "--out"):
            convert_hf_to_mcore(args.hf_dir, args.out, progress=not args.quiet, overwrite=args.overwrite,
                                verify=not args.skip_verify)
    except PebrError as e:
        print(f"convert_hf_to_mcore: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"convert_hf_to_mcore: error: {describe_os_error(e, 'converting to ' + args.out)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # the guard matters: Megatron's checkpoint writer may spawn a process
    raise SystemExit(main())
