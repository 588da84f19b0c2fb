"""The architecture a plan is made for: the model's HF `config.json` when it exists, else a built-in shape.

Built-in shapes are Qwen2.5-VL-3B-Instruct and -7B-Instruct, with the numbers of their published HF
configs (https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json and
https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json; read from copies of those files in
public repositories, and the same 7B figures that `tools/bench_train_step.py` uses). The 3B ties its
embeddings (no lm_head tensor) and has 2 KV heads; the 7B has 4 KV heads and an untied output layer; both
have the same vision tower (32 blocks, 1280 wide, full attention at blocks 7, 15, 23, 31).
"""
from __future__ import annotations

import re
from pathlib import Path

from pebr_mega.config_fields import ConfigError
from pebr_mega.errors import CheckpointError
from pebr_mega.models.arch import QwenVLArch, TextArch, VisionArch, arch_from_hf_dir

_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2.0,
               in_channels=3, hidden_act="silu", rope_theta=10000.0)
_TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652)


def _shape(vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, tied: bool) -> QwenVLArch:
    text = TextArch(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=1_000_000.0, mrope_section=(16, 24, 24),
                    tie_word_embeddings=tied, max_position_embeddings=128000)
    return QwenVLArch(text=text, vision=VisionArch(out_hidden_size=hidden, **_VISION), **_TOKENS)


BUILTIN_SHAPES: dict[str, QwenVLArch] = {
    "3b": _shape(vocab=151936, hidden=2048, ffn=11008, layers=36, heads=16, kv_heads=2, tied=True),
    "7b": _shape(vocab=152064, hidden=3584, ffn=18944, layers=28, heads=28, kv_heads=4, tied=False),
}
SHAPE_NAMES = {"3b": "Qwen2.5-VL-3B-Instruct", "7b": "Qwen2.5-VL-7B-Instruct"}
_SIZE_IN_NAME = re.compile(r"(?<![0-9a-z])([37])b(?![0-9a-z])", re.IGNORECASE)


def shape_from_path(path: str) -> str | None:
    """`"3b"` or `"7b"` when the path names that size (e.g. `Qwen2.5-VL-7B-Instruct`, `checkpoints/pebr_3b/sft`)."""
    found = {m.group(1) + "b" for m in _SIZE_IN_NAME.finditer(path.replace("_", "-"))}
    return found.pop() if len(found) == 1 else None


def resolve_arch(model_path: str, model_shape: str | None = None, key: str = "model") -> tuple[QwenVLArch, str]:
    """(architecture, where it came from): `model_shape` if given, else `model_path/config.json`, else the
    built-in shape the path names. Anything else is a ConfigError naming `key` and `--model-shape`."""
    if model_shape:
        shape = model_shape.lower()
        if shape not in BUILTIN_SHAPES:
            raise ConfigError(f"--model-shape {model_shape!r} is not one of {sorted(BUILTIN_SHAPES)}")
        return BUILTIN_SHAPES[shape], f"built-in {SHAPE_NAMES[shape]} shape (--model-shape {shape})"
    if model_path and (Path(model_path) / "config.json").is_file():
        return arch_from_hf_dir(model_path), f"{Path(model_path) / 'config.json'}"
    shape = shape_from_path(model_path or "")
    if shape is not None:
        return BUILTIN_SHAPES[shape], f"built-in {SHAPE_NAMES[shape]} shape ({key}={model_path!r} has no config.json)"
    raise ConfigError(f"config key '{key}' = {model_path!r}: no config.json there and the path names no known size; "
                      f"pass --model-shape {'|'.join(sorted(BUILTIN_SHAPES))}")


def try_resolve_arch(model_path: str) -> tuple[QwenVLArch, str] | None:
    """Like `resolve_arch` without a shape option, but None when the architecture cannot be known."""
    try:
        return resolve_arch(model_path)
    except (ConfigError, CheckpointError):  # the loader reports a broken or missing model in its own words
        return None
