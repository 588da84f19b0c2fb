"""The DALI image backend: nvImageCodec decode and DALI resize, then torch normalise/patchify.

One small pipeline: encoded bytes and per-sample target sizes come in through two `external_source`s,
`fn.decoders.image` decodes them (device "mixed", i.e. nvJPEG on the GPU, when a GPU is used; "cpu" without
one), and `fn.resize` resizes each image to its own smart-resize target with cubic interpolation and
antialiasing. Normalising and patchifying then reuse `images.normalize_and_patchify`, on the output device.

Differences from the PIL backend (and so from transformers), all documented and tested:
- DALI's cubic resampling is not PIL's: the uint8 resized pixels differ by a few levels at sharp edges. The grid
  (`image_grid_thw`) is identical; `tests/data/test_images.py` bounds the mean absolute difference of the normalised
  pixel values (0.004 measured on uniform noise, the worst case; 0.0001 on a flat-coloured shapes image).
- Images DALI would read differently from the PIL backend are decoded by PIL (`images.load_image`) and handed
  to DALI as a lossless PNG, so both backends see the same RGB pixels: transparency (composited onto white;
  DALI would drop the alpha channel), an EXIF orientation other than 1 (applied, as the PIL backend applies
  it), more than 8 bits per sample (scaled to 8 bits, `images.to_8bit`), and in-memory PIL images. Every other
  file goes to DALI as it is, with `adjust_orientation=False` (nothing is left to rotate; DALI never rotates
  a second time). Target sizes come from the image header (read with PIL, no pixel decode).
- A DALI decode failure does not say which sample failed: the batch is then re-run one image at a time to
  name the bad one in the `ImageError`.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from pebr_mega.data.images import (HIGH_BIT_MODES, ImageConfig, ImageSource, ProcessedImages, exif_orientation,
                                   has_alpha, load_image, normalize_and_patchify, open_image, source_name,
                                   stack_processed, target_size)
from pebr_mega.errors import BackendUnavailableError, ImageError


def dali_install_command() -> str:
    """The pip command that installs DALI for this machine's CUDA (13 -> cuda130, else cuda120)."""
    cuda = torch.version.cuda or ""
    wheel = "nvidia-dali-cuda130" if cuda.split(".")[0].isdigit() and int(cuda.split(".")[0]) >= 13 \
        else "nvidia-dali-cuda120"
    return f"pip install {wheel}  (nvidia-dali-cuda130 for CUDA 13 drivers, nvidia-dali-cuda120 for CUDA 12)"


def dali_import_error() -> str | None:
    """None when `nvidia.dali` imports, else the reason it does not."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except Exception as e:  # ImportError, or an OSError from a missing CUDA/nvImageCodec library
        return f"{type(e).__name__}: {e}"
    return None


def build_pipeline(batch_size: int, num_threads: int, device_id: int | None) -> Any:
    """A DALI pipeline: external "encoded" bytes + "size" [h, w] -> RGB uint8 HWC images of exactly that size.

    `device_id=None` runs everything on the CPU; otherwise decoding is "mixed" (GPU output) and the resize runs
    on that GPU.
    """
    from nvidia.dali import fn, pipeline_def, types

    decoder_device = "cpu" if device_id is None else "mixed"

    # prefetch_queue_depth=1: each run consumes exactly the batch just fed (no read-ahead of inputs).
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    def resize_pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
        image = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB, adjust_orientation=False)
        return fn.resize(image, size=size, interp_type=types.INTERP_CUBIC, antialias=True)

    pipe = resize_pipeline()
    pipe.build()
    return pipe


def needs_pil(image: Image.Image) -> bool:
    """Whether DALI, given the file as it is, would see other pixels than the PIL backend (module docstring)."""
    return has_alpha(image) or exif_orientation(image) != 1 or image.mode in HIGH_BIT_MODES


def encoded_bytes(source: ImageSource, name: str) -> tuple[bytes, tuple[int, int]]:
    """(encoded image bytes DALI can decode to the right RGB, (height, width) from the header)."""
    if not isinstance(source, Image.Image):
        with open_image(source, name) as image:
            via_pil, size = needs_pil(image), (image.height, image.width)
        if not via_pil:
            data = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else _read_file(source, name)
            return data, size
    # Decode with PIL (transparency onto white, upright, 8-bit) and hand DALI a lossless PNG of the result.
    rgb = load_image(source, name)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), (rgb.height, rgb.width)


def _read_file(path: Any, name: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read image file {name}: {e}") from None


class DaliImageDecoder:
    """GPU (or CPU) backend over NVIDIA DALI; see the module docstring for how it differs from PIL."""

    name = "dali"

    def __init__(self, cfg: ImageConfig, device: torch.device | str | None = None) -> None:
        reason = dali_import_error()
        if reason is not None:
            raise BackendUnavailableError(f"image backend 'dali' cannot load ({reason}); install it with: "
                                          f"{dali_install_command()}, or set images.backend=pil")
        self.cfg = cfg
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailableError(f"image backend 'dali' asked for {self.device} but CUDA is not "
                                              "available; use device cpu or images.backend=pil")
            self.device_id: int | None = self.device.index if self.device.index is not None \
                else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise BackendUnavailableError(f"image backend 'dali' cannot run on device {self.device}")
        self._pipe: Any = None

    def _pipeline(self) -> Any:
        if self._pipe is None:
            self._pipe = build_pipeline(self.cfg.dali_batch_size, self.cfg.dali_threads, self.device_id)
        return self._pipe

    def _run(self, pipe: Any, data: list[bytes], sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in data])
        pipe.feed_input("size", [np.array(s, dtype=np.float32) for s in sizes])
        (out,) = pipe.run()
        # DALI reuses its output buffers on the next run: copy each image out now.
        return [torch.from_dlpack(out[i]).to(self.device, copy=True) for i in range(len(data))]

    def _decode_chunk(self, data: list[bytes], sizes: list[tuple[int, int]], names: list[str]) -> list[torch.Tensor]:
        try:
            return self._run(self._pipeline(), data, sizes)
        except RuntimeError:
            self._pipe = None  # a failed run invalidates the pipeline
        # DALI does not say which sample failed: find it with one fresh single-image pipeline per sample.
        for d, s, n in zip(data, sizes, names):
            try:
                self._run(build_pipeline(1, 1, self.device_id), [d], [s])
            except RuntimeError as e:
                last = [line for line in str(e).splitlines() if "failure" in line or "rror" in line][-1:]
                raise ImageError(f"cannot decode image {n} with DALI: {' '.join(last) or 'decode failed'}") from None
        raise ImageError(f"DALI failed on a batch of {len(names)} images ({names[0]}, ...) but on none alone")

    def decode_and_preprocess(self, sources: Sequence[ImageSource]) -> ProcessedImages:
        """Decode, resize, normalise and patchify `sources` in order; `ImageError` names the first bad one."""
        names = [source_name(s, i) for i, s in enumerate(sources)]
        data, sizes = [], []
        for source, name in zip(sources, names):
            encoded, (height, width) = encoded_bytes(source, name)
            data.append(encoded)
            sizes.append(target_size(height, width, self.cfg, name))
        patches, grids = [], []
        step = self.cfg.dali_batch_size
        for start in range(0, len(data), step):
            chunk = slice(start, start + step)
            images = self._decode_chunk(data[chunk], sizes[chunk], names[chunk])
            for image, size, name in zip(images, sizes[chunk], names[chunk]):
                if tuple(image.shape[:2]) != size:
                    raise ImageError(f"DALI resized image {name} to {tuple(image.shape[:2])}, expected {size}")
                rows, grid = normalize_and_patchify(image, self.cfg)
                patches.append(rows)
                grids.append(grid)
        return stack_processed(patches, grids, self.cfg, self.device)
