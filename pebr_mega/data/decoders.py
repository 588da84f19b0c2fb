"""The choice of image backend: `make_image_decoder` builds the PIL or the DALI decoder.

This is the only module that imports both backends; each backend imports only the shared
`pebr_mega.data.images`.
"""
from __future__ import annotations

import torch

from pebr_mega.data.dali_backend import DaliImageDecoder, dali_import_error
from pebr_mega.data.images import ImageConfig, ImageDecoder
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.versions import require_in_window


def resolve_backend(cfg: ImageConfig, device: torch.device | str | None = None) -> str:
    """The backend `make_image_decoder` builds: `cfg.backend`, or for `auto` DALI when it imports and the
    target device is CUDA (or unspecified with CUDA present), else PIL."""
    if cfg.backend != "auto":
        return cfg.backend
    wants_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "dali" if wants_cuda and torch.cuda.is_available() and dali_import_error() is None else "pil"


def make_image_decoder(cfg: ImageConfig, device: torch.device | str | None = None) -> ImageDecoder:
    """Build the decoder `cfg.backend` names (see `resolve_backend`).

    A backend named explicitly that cannot load raises `BackendUnavailableError` with the reason and the
    install command; it never falls back silently. `device` is where the output tensors live (default: the
    GPU for DALI when CUDA is present, else the CPU).
    """
    if resolve_backend(cfg, device) == "dali":
        require_in_window("dali")
        return DaliImageDecoder(cfg, device)
    return PilImageDecoder(cfg, device)
