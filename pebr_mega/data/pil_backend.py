"""The PIL image backend: decode and bicubic resize with PIL on the CPU, then normalise/patchify in torch.

Bit for bit the output of transformers' `Qwen2VLImageProcessor` (see `pebr_mega.data.images`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from pebr_mega.data.images import (ImageConfig, ImageSource, ProcessedImages, load_image, normalize_and_patchify,
                                   policy_view, source_name, stack_processed)


class PilImageDecoder:
    """CPU backend: PIL decode and bicubic resize; equal to transformers' Qwen2-VL processor output."""

    name = "pil"

    def __init__(self, cfg: ImageConfig, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device or "cpu")

    def resize(self, image: Image.Image, name: str) -> Image.Image:
        """Bicubic resize of an RGB image to its smart-resize target (`ImageError` when it breaks the rules)."""
        return policy_view(image, self.cfg, name)

    def decode_and_preprocess(self, sources: Sequence[ImageSource]) -> ProcessedImages:
        """Decode, resize, normalise and patchify `sources` in order; `ImageError` names the first bad one."""
        patches, grids = [], []
        for i, source in enumerate(sources):
            name = source_name(source, i)
            image = self.resize(load_image(source, name), name)
            pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).to(self.device)
            rows, grid = normalize_and_patchify(pixels, self.cfg)
            patches.append(rows)
            grids.append(grid)
        return stack_processed(patches, grids, self.cfg, self.device)


