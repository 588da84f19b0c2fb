"""Build a tiny random CLIP in Hugging Face format, offline (same as `pebr make-tiny-clip`).

    python tools/make_tiny_clip.py --out /tmp/tiny-clip [--image-size 336] [--seed 0]
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pebr_mega.cli import main

    raise SystemExit(main(["make-tiny-clip", *sys.argv[1:]]))
