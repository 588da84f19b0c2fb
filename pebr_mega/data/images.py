"""Qwen2.5-VL image preprocessing: load, smart-resize, normalise and patchify, behind one decoder contract.

What the vision tower expects (the semantics of transformers' `Qwen2VLImageProcessor`, reimplemented here):

1. RGB, with any transparency composited onto white. Before that, two steps transformers' processor (and
   upstream's EasyR1 / LLaMA-Factory loading) does not take, so that the model sees what a viewer shows: the
   EXIF orientation is applied (`ImageOps.exif_transpose`: a portrait photo stored sideways arrives upright),
   and a high-bit-depth image (PIL modes I;16*, I, F) is scaled to 8 bits (`to_8bit`), where PIL's
   `convert` would clip every value above 255 (a 16-bit PNG turned almost all white).
2. A bicubic resize to (h, w), both multiples of `factor` = patch 14 x merge 2 = 28, chosen by `smart_resize`
   so that h * w lies in [min_pixels, max_pixels] and the aspect ratio is kept as closely as possible.
3. uint8 -> [0, 1] (x * (1/255) in float64, then float32), then (x - mean) / std with the OpenAI CLIP mean and
   std, in float32, channel by channel.
4. Patchify: the (C, h, w) image is cut into 14 x 14 patches, ordered so that the 2 x 2 patches merged into
   one LLM token are adjacent, and each patch is repeated `temporal_patch_size` = 2 times (a still image is a
   one-frame video whose frame is duplicated). Row i of `pixel_values` is one patch, flattened as
   (C, T, P, P); `image_grid_thw` holds (1, h / 14, w / 14) per image.

This module holds what every backend shares (the config, the sizes, loading, normalise/patchify) and no
backend itself. Two backends implement the `ImageDecoder` contract, each importing this module:
`pebr_mega.data.pil_backend.PilImageDecoder` (CPU; bit-for-bit the transformers output) and
`pebr_mega.data.dali_backend.DaliImageDecoder` (nvImageCodec decode + DALI cubic resize, then the same torch
normalise/patchify on the GPU). `pebr_mega.data.decoders.make_image_decoder`, the only module that imports
both, picks one.

Data rules: an image that cannot be opened, or one that is missing, is rejected with an `ImageError` naming it;
so is an aspect ratio > 200 (which transformers refuses with a ValueError) and an image whose smart-resized size
falls outside the pixel bounds (`smart_resize` clamps a side to `factor`, which can exceed `max_pixels` for
extreme aspect ratios). An image with a side under 28 px (one merged patch) is scaled up by `smart_resize`, as
upstream's processor does (EasyR1 passes such images on); `images.reject_small_sides: true` rejects it instead
(PEBR_FACTS' rule for the SFT data, which `pebr filter-sft` applies).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from pebr_mega.config_fields import check_fields, choice
from pebr_mega.errors import ImageError

# OpenAI CLIP statistics, used by every Qwen2-VL / Qwen2.5-VL image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Transformers refuses more elongated images than this (max side / min side).
MAX_ASPECT_RATIO = 200

ImageSource = Union[str, os.PathLike, bytes, Image.Image]


@dataclass
class ImageConfig:
    """How images become vision-tower inputs.

    The pixel bounds default to PEBR_FACTS' RL settings: "image pixels in [576, 802816] (= 1024 x 28 x 28)",
    i.e. min_pixels = 576 and max_pixels = 802816. (Transformers' own defaults are 56*56 and 28*28*1280.)
    """

    backend: str = choice("auto", ["auto", "pil", "dali"],
                          "auto = DALI when nvidia.dali imports and CUDA is present, else PIL")
    min_pixels: int = 576
    max_pixels: int = 802816
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    dali_batch_size: int = 32  # images per DALI pipeline run (its max_batch_size)
    dali_threads: int = 2  # CPU threads of the DALI pipeline
    # An image with a side under patch_size x merge_size (28) px: scaled up (upstream) or rejected (true).
    reject_small_sides: bool = False

    def __post_init__(self) -> None:
        check_fields("images", {
            **{key: (getattr(self, key) >= 1, getattr(self, key), "must be >= 1")
               for key in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size",
                           "dali_batch_size", "dali_threads")},
            "min_pixels": (1 <= self.min_pixels <= self.max_pixels, self.min_pixels,
                           f"must be >= 1 and <= images.max_pixels = {self.max_pixels}"),
        })

    @classmethod
    def of_model(cls, model_dir: str | Path) -> "ImageConfig":
        """Pixel bounds from an HF model's own preprocessor_config.json (what it was trained with), else the
        defaults: how a command prompting an exported model (`pebr eval`, `pebr infer`) sizes its images."""
        import json

        f = Path(model_dir) / "preprocessor_config.json"
        default = cls()
        if not f.is_file():
            return default
        pc = json.loads(f.read_text())
        size = pc.get("size") or {}
        return cls(min_pixels=int(pc.get("min_pixels") or size.get("shortest_edge") or default.min_pixels),
                   max_pixels=int(pc.get("max_pixels") or size.get("longest_edge") or default.max_pixels))


@dataclass
class ProcessedImages:
    """A batch of images as Qwen2.5-VL takes them.

    pixel_values: float32 [sum of h*w/14^2 over images, C * T * P * P]; image_grid_thw: int64 [num_images, 3].
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def to(self, device: torch.device | str) -> "ProcessedImages":
        """The same batch on `device`."""
        return ProcessedImages(self.pixel_values.to(device), self.image_grid_thw.to(device))


class ImageDecoder(Protocol):
    """The backend contract: sources in, vision-tower inputs out (one `ImageError` names a bad source)."""

    name: str
    device: torch.device
    cfg: ImageConfig

    def decode_and_preprocess(self, sources: Sequence[ImageSource]) -> ProcessedImages:
        """Decode, smart-resize, normalise and patchify `sources`, in order."""
        ...


# ---------------------------------------------------------------------------------------------- sizes
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """The (height, width) Qwen2-VL resizes an image to, with transformers' rounding rules.

    Each side is rounded to the nearest multiple of `factor`. If the area then exceeds `max_pixels`, both sides
    are scaled by 1/beta with beta = sqrt(h*w / max_pixels) and floored to a multiple of `factor` (but kept
    >= `factor`); if it falls below `min_pixels`, they are scaled by beta = sqrt(min_pixels / (h*w)) and
    ceiled. Raises ValueError (as transformers does) for an aspect ratio above 200 or an empty side.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, "
                         f"got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(height: int, width: int, cfg: ImageConfig, name: str = "<image>") -> tuple[int, int]:
    """`smart_resize` under the data rules: `ImageError` naming `name` when the image must be rejected."""
    factor = cfg.patch_size * cfg.merge_size
    if cfg.reject_small_sides and min(height, width) < factor:
        raise ImageError(f"image {name} is {width}x{height} px; both sides must be >= {factor} px "
                         f"(patch {cfg.patch_size} x merge {cfg.merge_size})")
    try:
        h, w = smart_resize(height, width, factor, cfg.min_pixels, cfg.max_pixels)
    except ValueError as e:
        raise ImageError(f"image {name} ({width}x{height} px): {e}") from None
    if not cfg.min_pixels <= h * w <= cfg.max_pixels:
        raise ImageError(f"image {name} ({width}x{height} px) resizes to {w}x{h} = {h * w} px, outside "
                         f"[min_pixels={cfg.min_pixels}, max_pixels={cfg.max_pixels}]")
    return h, w


def num_image_tokens(grid_thw: torch.Tensor | Sequence[Sequence[int]], merge_size: int = 2) -> list[int]:
    """LLM tokens per image: t * h * w patches, merged merge_size x merge_size into one token."""
    rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else [list(r) for r in grid_thw]
    return [int(t) * int(h) * int(w) // (merge_size * merge_size) for t, h, w in rows]


# ---------------------------------------------------------------------------------------------- loading
# `load_image` records the file an RGB image was decoded from under this `Image.info` key, so that a later
# error about the decoded image (too small, extreme aspect ratio) names the file, not its position.
SOURCE_KEY = "pebr_source"


def source_name(source: ImageSource, index: int | None = None) -> str:
    """How error messages name a source: its path (also for an image `load_image` decoded from a file), or its
    position for other in-memory images."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image) and source.info.get(SOURCE_KEY):
        return str(source.info[SOURCE_KEY])
    kind = "bytes" if isinstance(source, (bytes, bytearray, memoryview)) else "PIL image"
    return f"<{kind} #{index}>" if index is not None else f"<{kind}>"


def has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency (an alpha band or a transparent palette/colour key)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, compositing any transparency onto white (what transformers 5.25's Qwen2-VL processor does; how it
    converts palette, grayscale and RGBA images changed between releases, so the rule is ours, stated here)."""
    if has_alpha(image):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# PIL modes holding more than 8 bits per sample: 16-bit integer (PNG, TIFF), 32-bit integer, 32-bit float.
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
UINT16_MAX = 65535


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored, 2-8 = mirrored and/or rotated), 1 when absent or unreadable."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a malformed EXIF block: treat it as absent, as viewers do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _sample_range(values: np.ndarray, mode: str) -> tuple[float, float]:
    """The value range that maps onto 0..255: the 16-bit range for 16-bit data, [0, 1] for floats within it,
    else the image's own finite minimum and maximum (a 32-bit image has no other known range)."""
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= UINT16_MAX):
        return 0.0, float(UINT16_MAX)  # Pillow opens 16-bit PNG/TIFF as I;16 (or I, in older versions)
    if mode == "F" and lo >= 0 and hi <= 1:
        return 0.0, 1.0
    return lo, hi


def to_8bit(image: Image.Image) -> Image.Image:
    """A high-bit-depth image (`HIGH_BIT_MODES`) scaled linearly to 8-bit "L" (rounded; NaN -> 0), with its
    transparent colour key, if any, kept as an alpha band ("LA"); any other image unchanged.

    PIL's own `convert("L")`/`convert("RGB")` clips these modes at 255 instead of scaling them.
    """
    if image.mode not in HIGH_BIT_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    lo, hi = _sample_range(values, image.mode)
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    pixels = np.clip(np.nan_to_num(np.rint(scaled), nan=0.0), 0, 255).astype(np.uint8)
    gray = Image.fromarray(pixels, "L")
    key = image.info.get("transparency")
    if isinstance(key, (int, float)):  # a PNG colour key is a sample value, in the 16-bit range
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (gray, alpha))
    return gray


def upright_8bit(image: Image.Image) -> Image.Image:
    """A decoded image as a viewer shows it: EXIF orientation applied, high bit depths scaled to 8 bits."""
    if exif_orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    return to_8bit(image)


def open_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Open `source` lazily (header only, no pixel decode); `ImageError` naming it when missing or unreadable."""
    name = name or source_name(source)
    if isinstance(source, Image.Image):
        return source
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            return Image.open(io.BytesIO(bytes(source)))
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {name}")
        return Image.open(path)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(f"cannot open image {name}: not a recognised image format (corrupt?)") from None
    except Exception as e:  # PIL raises OSError, ValueError, DecompressionBombError, ... on bad input
        raise ImageError(f"cannot open image {name}: {type(e).__name__}: {e}") from None


def load_image(source: ImageSource, name: str | None = None) -> Image.Image:
    """Decode `source` (path, encoded bytes or PIL image) to an RGB PIL image, upright and 8-bit (`upright_8bit`).

    Raises `ImageError` naming the file for a missing, corrupt or truncated image.
    """
    name = name or source_name(source)
    image = open_image(source, name)
    try:
        image.load()  # decode now: a truncated file only fails here
        # `to_rgb` always makes a new image (convert copies), so closing the opened one is safe.
        rgb = to_rgb(upright_8bit(image))
        if isinstance(source, (str, os.PathLike)):
            rgb.info[SOURCE_KEY] = str(source)
        return rgb
    except Exception as e:
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None
    finally:
        if image is not source:
            image.close()


def policy_view(image: Image.Image, cfg: ImageConfig, name: str = "<image>") -> Image.Image:
    """An RGB image as the policy sees it: bicubic-resized to its smart-resize target under `cfg`'s pixel bounds
    (`ImageError` when it breaks the data rules). The CLIP reward scores this view (upstream's reward reads the
    prompt's first image after the same pixel-bound resize)."""
    h, w = target_size(image.height, image.width, cfg, name)
    return image.resize((w, h), resample=Image.Resampling.BICUBIC)


# ---------------------------------------------------------------------------------------------- tensors
def normalize_and_patchify(image: torch.Tensor, cfg: ImageConfig) -> tuple[torch.Tensor, list[int]]:
    """A resized uint8 [H, W, C] image (on any device) -> (patches [H*W/P^2, C*T*P*P] float32, [1, H/P, W/P]).

    The rescale runs in float64 and is rounded once to float32, as transformers does, so the PIL backend
    matches it bit for bit.
    """
    height, width, channels = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"resized image {width}x{height} is not a multiple of {p * m} px")
    x = (image.permute(2, 0, 1).to(torch.float64) * (1 / 255)).to(torch.float32)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=x.device).view(-1, 1, 1)
    x = (x - mean) / std
    gh, gw = height // p, width // p
    # (C, gh/m, m, P, gw/m, m, P) -> (gh/m, gw/m, m, m, C, P, P): the m x m patches of one LLM token are adjacent.
    x = x.reshape(channels, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    # Repeat each patch along a new temporal axis after C: rows flatten as (C, T, P, P).
    x = x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1)
    return x.reshape(gh * gw, channels * t * p * p), [1, gh, gw]


def stack_processed(patches: list[torch.Tensor], grids: list[list[int]], cfg: ImageConfig,
                    device: torch.device) -> ProcessedImages:
    """Concatenate per-image patches and grids into one `ProcessedImages` (empty inputs give empty tensors)."""
    dim = 3 * cfg.temporal_patch_size * cfg.patch_size ** 2
    pixel_values = torch.cat(patches) if patches else torch.empty(0, dim, dtype=torch.float32, device=device)
    grid = torch.tensor(grids, dtype=torch.long, device=device).reshape(-1, 3)
    return ProcessedImages(pixel_values, grid)
