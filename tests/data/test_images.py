"""Image preprocessing: parity with transformers' Qwen2-VL processor, the data rules, both backends."""
from __future__ import annotations

import io
import random
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from pebr_mega.config import load_config
from pebr_mega.data.decoders import make_image_decoder, resolve_backend
from pebr_mega.data.images import ImageConfig, load_image, num_image_tokens, smart_resize, to_rgb
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.errors import BackendUnavailableError, ImageError

ODD_SIZES = [(29, 300), (100, 130), (57, 57), (333, 77), (1000, 30)]  # (width, height)
# (min_pixels, max_pixels): PEBR_FACTS' RL bounds, transformers' defaults, the tiny model's, and a tight max.
BOUNDS = [(576, 802816), (56 * 56, 28 * 28 * 1280), (56 * 56, 224 * 224), (576, 28 * 28 * 16)]

# Measured with DALI 2.4.0 on CPU: mean |DALI - PIL| of normalised pixel values is 0.004 on uniform noise
# (the worst case for resampling differences) and 0.0001 on a flat-coloured shapes image. The bound leaves
# headroom for other DALI versions while still catching a wrong resize filter, channel order or size.
DALI_MEAN_ABS_BOUND = 0.02


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def _shapes(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (245, 245, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse((5, 5, width // 2, height // 2), fill=(220, 40, 40))
    draw.rectangle((width // 2, height // 3, width - 6, height - 6), fill=(40, 80, 220))
    return image


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _reference(images: list[Image.Image], min_pixels: int, max_pixels: int) -> dict:
    """transformers' Qwen2-VL PIL processor on the images after our RGB rule (`to_rgb`: transparency composited
    on white, tested on its own below). The rule goes first because transformers changed its own conversion of
    palette, grayscale and RGBA images between 5.19 and 5.25 (`image_processing_backends.py`), and both are in
    the supported window: what is compared is the resize, rescale, normalisation and patch order."""
    rgb = [to_rgb(image) for image in images]
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=rgb, return_tensors="pt")


# ---------------------------------------------------------------------------------------------- sizes
def test_smart_resize_matches_transformers_on_random_sizes():
    rng = random.Random(0)
    for _ in range(3000):
        height, width = rng.randint(1, 3000), rng.randint(1, 3000)
        lo = rng.choice([576, 3136, 28 * 28 * 4, 28 * 28 * 100])
        hi = lo * rng.choice([1, 2, 16, 1400])
        try:
            expected = hf_smart_resize(height, width, 28, lo, hi)
        except ValueError:
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(height, width, 28, lo, hi)
            continue
        assert smart_resize(height, width, 28, lo, hi) == expected, (height, width, lo, hi)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("min_pixels,max_pixels", BOUNDS)
def test_pil_backend_equals_transformers_on_odd_sizes(min_pixels, max_pixels):
    cfg = ImageConfig(backend="pil", min_pixels=min_pixels, max_pixels=max_pixels)
    images = [_noise(w, h, seed=i) for i, (w, h) in enumerate(ODD_SIZES)]
    images += [_noise(45, 61, 10, "RGBA"), _noise(64, 33, 11, "L"), _noise(70, 50, 12).convert("P")]
    if max_pixels == 28 * 28 * 16:
        images = [im for im in images if im.size != (1000, 30)]  # breaks the bounds there: see the next test
    ref = _reference(images, min_pixels, max_pixels)
    out = make_image_decoder(cfg).decode_and_preprocess(images)
    assert torch.equal(out.image_grid_thw, ref["image_grid_thw"])
    assert out.pixel_values.dtype == torch.float32 and out.pixel_values.shape == ref["pixel_values"].shape
    assert (out.pixel_values - ref["pixel_values"]).abs().max().item() < 1e-5
    assert num_image_tokens(out.image_grid_thw) == [int(t * h * w) // 4 for t, h, w in ref["image_grid_thw"]]
    assert sum(num_image_tokens(out.image_grid_thw)) * 4 == out.pixel_values.shape[0]


def test_pil_backend_reads_paths_and_bytes_like_transformers(tmp_path):
    images = [_shapes(168, 112), _noise(57, 57, 3), _noise(130, 100, 4, "RGBA")]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"im{i}.png")
        image.save(paths[-1])
    jpeg = tmp_path / "photo.jpg"
    _noise(90, 70, 5).save(jpeg, quality=90)
    sources = [str(paths[0]), paths[1], _encode(images[2]), jpeg]
    ref = _reference([Image.open(p) for p in paths] + [Image.open(jpeg)], 576, 802816)
    out = PilImageDecoder(ImageConfig()).decode_and_preprocess(sources)
    assert torch.equal(out.image_grid_thw, ref["image_grid_thw"])
    assert (out.pixel_values - ref["pixel_values"]).abs().max().item() < 1e-5


def test_empty_batch_gives_empty_tensors():
    out = PilImageDecoder(ImageConfig()).decode_and_preprocess([])
    assert out.pixel_values.shape == (0, 3 * 2 * 14 * 14) and out.image_grid_thw.shape == (0, 3)


# ---------------------------------------------------------------------------------------------- data rules
@pytest.mark.parametrize("width,height", [(1, 1), (27, 300), (300, 27), (13, 40)])
def test_side_below_28_px_is_scaled_up_as_upstream_or_rejected_on_request(width, height):
    """Issue 24, item 7: upstream's processor (transformers' smart_resize) scales a side under 28 px up to one
    merged patch and passes the image on; `images.reject_small_sides` keeps the stricter rule."""
    image = _noise(width, height, 0)
    out = PilImageDecoder(ImageConfig()).decode_and_preprocess([image])
    ref = _reference([image], 576, 802816)
    assert torch.equal(out.image_grid_thw, ref["image_grid_thw"]) and min(out.image_grid_thw[0, 1:].tolist()) >= 2
    assert (out.pixel_values - ref["pixel_values"]).abs().max().item() < 1e-5
    with pytest.raises(ImageError, match=r"#0.*>= 28 px"):
        PilImageDecoder(ImageConfig(reject_small_sides=True)).decode_and_preprocess([image])


def test_resized_size_outside_bounds_is_an_image_error():
    # 1000x30 at max_pixels 12544: smart_resize keeps the short side at 28 px, so 644 x 28 = 18032 > 12544.
    cfg = ImageConfig(min_pixels=576, max_pixels=28 * 28 * 16)
    with pytest.raises(ImageError, match=r"#1> \(30x1000 px\).*18032 px, outside"):
        PilImageDecoder(cfg).decode_and_preprocess([_noise(57, 57, 0), _noise(30, 1000, 1)])
    # transformers would not reject it: the check is ours, from the pixel bounds.
    assert tuple(_reference([_noise(30, 1000, 1)], 576, 28 * 28 * 16)["image_grid_thw"][0]) == (1, 46, 2)


def test_aspect_ratio_above_200_is_an_image_error():
    with pytest.raises(ImageError, match="aspect ratio"):
        PilImageDecoder(ImageConfig()).decode_and_preprocess([_noise(28 * 201, 28, 0)])


def test_missing_corrupt_and_truncated_files_are_image_errors_naming_them(tmp_path):
    decoder = PilImageDecoder(ImageConfig())
    missing = tmp_path / "nowhere.png"
    with pytest.raises(ImageError, match="not found: .*nowhere.png"):
        load_image(missing)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really an image" * 10)
    with pytest.raises(ImageError, match="corrupt.png"):
        decoder.decode_and_preprocess([str(corrupt)])
    with pytest.raises(ImageError, match=r"<bytes #1>"):
        decoder.decode_and_preprocess([_encode(_noise(40, 40, 0)), b"garbage bytes" * 8])
    for fmt, ext in [("PNG", "png"), ("JPEG", "jpg")]:
        full = _encode(_noise(120, 90, 1), fmt)
        truncated = tmp_path / f"truncated.{ext}"
        truncated.write_bytes(full[: len(full) // 2])
        with pytest.raises(ImageError, match=f"truncated.{ext}"):
            load_image(truncated)


def test_load_image_composites_transparency_on_white():
    rgba = Image.new("RGBA", (30, 30), (255, 0, 0, 0))
    assert load_image(_encode(rgba)).getpixel((3, 3)) == (255, 255, 255)
    assert load_image(_encode(rgba)).mode == "RGB"


# ---------------------------------------------------------------------------------------------- backend choice
def test_images_section_in_root_config():
    cfg = load_config(overrides=["images.backend=dali", "images.max_pixels=50176"])
    assert isinstance(cfg.images, ImageConfig) and cfg.images.backend == "dali" and cfg.images.min_pixels == 576


def test_auto_picks_pil_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend(ImageConfig(backend="auto")) == "pil"
    assert make_image_decoder(ImageConfig(backend="auto")).name == "pil"


def test_named_dali_unavailable_raises_with_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` raise ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install nvidia-dali-cuda1[23]0"):
        make_image_decoder(ImageConfig(backend="dali"))
    # auto falls back to PIL only because nothing was named.
    assert make_image_decoder(ImageConfig(backend="auto")).name == "pil"


# ---------------------------------------------------------------------------------------------- DALI on CPU
def test_dali_backend_on_cpu_same_grid_close_pixels(tmp_path):
    pytest.importorskip("nvidia.dali")
    jpeg = tmp_path / "photo.jpg"
    _shapes(150, 110).save(jpeg, quality=95)
    sources = [_encode(_noise(w, h, i)) for i, (w, h) in enumerate(ODD_SIZES)]
    sources += [_shapes(173, 101), str(jpeg), _encode(_noise(45, 61, 9, "RGBA"))]
    cfg = ImageConfig(backend="dali", dali_batch_size=3)  # 8 images: three pipeline runs, the last one short
    dali = make_image_decoder(cfg, device="cpu")
    assert dali.name == "dali"
    out = dali.decode_and_preprocess(sources)
    ref = PilImageDecoder(cfg).decode_and_preprocess(sources)
    assert torch.equal(out.image_grid_thw, ref.image_grid_thw)
    assert out.pixel_values.shape == ref.pixel_values.shape and out.pixel_values.dtype == torch.float32
    diff = (out.pixel_values - ref.pixel_values).abs()
    assert diff.mean().item() < DALI_MEAN_ABS_BOUND
    assert diff.mean().item() > 0  # a different resampler, not PIL in disguise
    # A flat-coloured image resamples almost identically (measured 0.0001; with the channels swapped: 0.9).
    rows = ref.image_grid_thw.prod(dim=1).tolist()
    start = sum(rows[:5])
    assert diff[start:start + rows[5]].mean().item() < 0.005


def test_dali_backend_names_the_truncated_file_and_enforces_rules(tmp_path):
    pytest.importorskip("nvidia.dali")
    full = _encode(_noise(120, 90, 1), "PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(full[: len(full) // 2])  # the header is intact: only the decode fails
    dali = make_image_decoder(ImageConfig(backend="dali", dali_batch_size=4), device="cpu")
    with pytest.raises(ImageError, match="cut.png"):
        dali.decode_and_preprocess([full, str(truncated), full])
    small = _encode(_noise(27, 300, 0))  # scaled up as PIL (and upstream) do, or refused on request
    assert torch.equal(dali.decode_and_preprocess([small]).image_grid_thw,
                       PilImageDecoder(ImageConfig()).decode_and_preprocess([small]).image_grid_thw)
    strict = make_image_decoder(ImageConfig(backend="dali", reject_small_sides=True), device="cpu")
    with pytest.raises(ImageError, match=">= 28 px"):
        strict.decode_and_preprocess([small])
    with pytest.raises(ImageError, match="not found"):
        dali.decode_and_preprocess([str(tmp_path / "missing.png")])
    # The decoder recovers after a failed run.
    assert dali.decode_and_preprocess([full]).image_grid_thw.tolist() == [[1, 6, 8]]


@pytest.mark.gpu
def test_dali_backend_on_gpu_matches_its_cpu_pipeline_grid_and_pixels():
    pytest.importorskip("nvidia.dali")
    sources = [_encode(_noise(w, h, i)) for i, (w, h) in enumerate(ODD_SIZES)] + [_shapes(173, 101)]
    cfg = ImageConfig(backend="dali", dali_batch_size=4)
    gpu = make_image_decoder(cfg)  # auto device: the current GPU, nvJPEG/"mixed" decode
    out = gpu.decode_and_preprocess(sources)
    assert out.pixel_values.device.type == "cuda"
    ref = PilImageDecoder(cfg).decode_and_preprocess(sources)
    assert torch.equal(out.image_grid_thw.cpu(), ref.image_grid_thw)
    assert (out.pixel_values.cpu() - ref.pixel_values).abs().mean().item() < DALI_MEAN_ABS_BOUND
    assert resolve_backend(ImageConfig(backend="auto")) == "dali"


# ---------------------------------------------------------------------------------------------- bit depth, EXIF
# Issue 23, item 9. The expectations are computed here with numpy from the pixels the test wrote, not with
# the code under test: a linear map of the 16-bit range onto 0..255, and the rotation EXIF orientation 6 asks for.
def _gradient16(width: int = 256, height: int = 40) -> np.ndarray:
    """A horizontal 16-bit gradient spanning 0..65535 (uint16 [H, W])."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(row, (height, 1))


def _expected_8bit(values: np.ndarray, top: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float64) * 255.0 / top), 0, 255).astype(np.uint8)


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    path = tmp_path / "gradient16.png"
    values = _gradient16()
    Image.fromarray(values).save(path)  # a 16-bit grayscale PNG (PIL mode I;16)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path))
    expected = _expected_8bit(values, 65535)
    assert rgb.shape == (*values.shape, 3) and all(np.array_equal(rgb[..., c], expected) for c in range(3))
    assert (rgb == 255).mean() < 0.01  # PIL's convert("RGB") made 99.6% of this image white


@pytest.mark.parametrize("mode, values, top", [
    ("I", _gradient16().astype(np.int32), 65535),  # 32-bit integers holding 16-bit samples (older Pillow's PNG)
    ("F", _gradient16().astype(np.float32) / 65535, 1.0),  # floats in [0, 1]
])
def test_32_bit_integer_and_float_images_are_scaled_too(mode, values, top):
    image = Image.fromarray(values, mode)
    rgb = np.asarray(load_image(image))
    assert np.abs(rgb[..., 0].astype(int) - _expected_8bit(values, top).astype(int)).max() <= 1  # float rounding


def _exif_jpeg(path, orientation: int) -> np.ndarray:
    """A 120 x 80 JPEG (wider than tall, a red block at the top left) tagged with `orientation`; returns its
    pixels as stored (decoded without the tag)."""
    stored = Image.new("RGB", (120, 80), (240, 240, 240))
    ImageDraw.Draw(stored).rectangle((0, 0, 39, 19), fill=(220, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    stored.save(path, format="JPEG", quality=95, exif=exif)
    with Image.open(path) as raw:
        return np.asarray(raw.convert("RGB"))


def test_exif_orientation_6_is_applied(tmp_path):
    path = tmp_path / "portrait.jpg"
    stored = _exif_jpeg(path, 6)
    # Orientation 6: the stored image must be turned 90 degrees clockwise to be shown upright.
    expected = np.rot90(stored, k=-1)
    shown = np.asarray(load_image(path))
    assert shown.shape == (120, 80, 3) and np.array_equal(shown, expected)
    assert tuple(shown[2, -3]) == tuple(stored[2, 2])  # the red corner moved from top left to top right
    grid = PilImageDecoder(ImageConfig(min_pixels=576, max_pixels=50176)).decode_and_preprocess([path]).image_grid_thw
    assert grid.tolist() == [[1, 8, 6]]  # taller than wide: 112 x 84 px after the smart resize


def test_no_exif_or_orientation_1_is_left_as_stored(tmp_path):
    path = tmp_path / "landscape.jpg"
    stored = _exif_jpeg(path, 1)
    assert np.array_equal(np.asarray(load_image(path)), stored)


def test_dali_backend_agrees_with_pil_on_exif_and_16_bit_images(tmp_path):
    pytest.importorskip("nvidia.dali")
    _exif_jpeg(tmp_path / "portrait.jpg", 6)
    Image.fromarray(_gradient16(120, 90)).save(tmp_path / "gradient16.png")
    sources = [str(tmp_path / "portrait.jpg"), str(tmp_path / "gradient16.png")]
    cfg = ImageConfig(backend="dali", dali_batch_size=2, min_pixels=576, max_pixels=50176)
    out = make_image_decoder(cfg, device="cpu").decode_and_preprocess(sources)
    ref = PilImageDecoder(cfg).decode_and_preprocess(sources)
    assert out.image_grid_thw.tolist() == ref.image_grid_thw.tolist() == [[1, 8, 6], [1, 6, 8]]
    assert (out.pixel_values - ref.pixel_values).abs().mean().item() < DALI_MEAN_ABS_BOUND
