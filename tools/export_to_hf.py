#!/usr/bin/env python
"""Export a Megatron distributed checkpoint of Qwen2.5-VL to a complete HF model directory.

    python tools/export_to_hf.py --mcore-dir DIR --out DIR [--hf-template DIR] [--overwrite] [--skip-verify]

Writes safetensors weights plus config, tokenizer, image processor, chat template and generation config
(copied from --hf-template, or from the copy recorded at conversion time), and the export's MANIFEST.json.
Runs on CPU, one layer in memory at a time. The checkpoint is checked against its MANIFEST.json first (a
damaged one is refused, naming the file; --skip-verify exports it anyway, for forensics). A non-empty --out is
replaced only with --overwrite, and never when it is, holds or lies inside the source; one export at a time
writes an --out (a second is refused naming the first's pid and host). Ctrl-C or SIGTERM removes the unfinished
export. Bad input, and an OS error (no space, read-only, permission), is reported as one line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mcore-dir", required=True, help="Megatron checkpoint written by pebr_mega (any TP/PP)")
    p.add_argument("--out", required=True, help="output HF directory: written beside it, then renamed into place; "
                   "must not be or hold the source")
    p.add_argument("--hf-template", default=None, help="HF directory whose non-weight files to copy")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
    p.add_argument("--skip-verify", action="store_true",
                   help="export even when the checkpoint does not match its MANIFEST.json (forensics)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    import warnings

    # Megatron warns at import about optional accelerators (Apex, TE) and deprecations: noise for a CLI tool.
    warnings.filterwarnings("ignore", module=r"megatron\.")
    from pebr_mega.checkpoint.convert import export_mcore_to_hf
    from pebr_mega.errors import PebrError, describe_os_error
    from pebr_mega.outputs import lock_beside

    try:
        with lock_beside(args.out, "--out"):
            export_mcore_to_hf(args.mcore_dir, args.out, args.hf_template, progress=not args.quiet,
                               max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite,
                               verify=not args.skip_verify)
    except PebrError as e:
        print(f"export_to_hf: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"export_to_hf: error: {describe_os_error(e, 'exporting to ' + args.out)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the unfinished export was removed (pebr_mega.checkpoint.hf_io.atomic_dir said so)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
