"""The shape of a Qwen2.5-VL model, read from an HF `config.json`.

`QwenVLArch` is the single description of the architecture that the Megatron model, the vision tower, the
M-RoPE index and the checkpoint mapping all read; it is parsed once from the HF config. Both config layouts
are accepted: transformers 5 (`text_config.rope_parameters.mrope_section`) and transformers 4
(text fields at the top level, `rope_scaling.mrope_section`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pebr_mega.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
SUPPORTED_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(frozen=True)
class TextArch:
    """The Qwen2 decoder: GQA with qkv bias, SwiGLU, RMSNorm, M-RoPE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class VisionArch:
    """The Qwen2.5-VL ViT: patch embedding, window attention with some full-attention blocks, 2x2 merger."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]
    tokens_per_second: float
    in_channels: int
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class QwenVLArch:
    """The whole model: decoder, vision tower and the special token ids that glue them."""

    text: TextArch
    vision: VisionArch
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return asdict(self)


def _require(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise CheckpointError(f"{where}: missing key '{key}'")
    return d[key]


def arch_from_hf_config(cfg: dict, source: str = "config.json") -> QwenVLArch:
    """Parse a Qwen2.5-VL HF config dict; a wrong architecture or a missing key is a CheckpointError."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise CheckpointError(
            f"{source}: model_type={model_type!r}, architectures={archs} is not Qwen2.5-VL "
            f"(expected model_type in {list(SUPPORTED_MODEL_TYPES)})"
        )
    text = cfg.get("text_config") or cfg
    vis = _require(cfg, "vision_config", source)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or cfg.get("rope_scaling") or {}
    mrope = rope.get("mrope_section")
    if mrope is None:
        raise CheckpointError(f"{source}: no mrope_section in text_config.rope_parameters / rope_scaling")
    rope_theta = rope.get("rope_theta", text.get("rope_theta", cfg.get("rope_theta")))
    if rope_theta is None:
        raise CheckpointError(f"{source}: no rope_theta in text_config")
    tie = bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    t = TextArch(
        vocab_size=int(_require(text, "vocab_size", source)),
        hidden_size=int(_require(text, "hidden_size", source)),
        intermediate_size=int(_require(text, "intermediate_size", source)),
        num_layers=int(_require(text, "num_hidden_layers", source)),
        num_heads=int(_require(text, "num_attention_heads", source)),
        num_kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        mrope_section=tuple(int(x) for x in mrope),
        tie_word_embeddings=tie,
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
    )
    if 2 * sum(t.mrope_section) != t.head_dim:
        raise CheckpointError(f"{source}: mrope_section {list(t.mrope_section)} must sum to head_dim/2 = {t.head_dim // 2}")
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: text hidden_act {text.get('hidden_act')!r} is not 'silu'")
    vrope = vis.get("rope_parameters") or {}
    v = VisionArch(
        depth=int(_require(vis, "depth", source)),
        hidden_size=int(_require(vis, "hidden_size", source)),
        intermediate_size=int(_require(vis, "intermediate_size", source)),
        num_heads=int(_require(vis, "num_heads", source)),
        out_hidden_size=int(vis.get("out_hidden_size", t.hidden_size)),
        patch_size=int(vis.get("patch_size", 14)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        window_size=int(vis.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", [])),
        tokens_per_second=float(vis.get("tokens_per_second", 2)),
        in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
        hidden_act=str(vis.get("hidden_act", "silu")),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )
    if v.out_hidden_size != t.hidden_size:
        raise CheckpointError(f"{source}: vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
    return QwenVLArch(
        text=t,
        vision=v,
        image_token_id=int(_require(cfg, "image_token_id", source)),
        video_token_id=int(cfg.get("video_token_id", -1)),
        vision_start_token_id=int(cfg.get("vision_start_token_id", -1)),
    )


def arch_from_hf_dir(hf_dir: str | Path) -> QwenVLArch:
    """Read `hf_dir/config.json`; a missing or unparsable file is a CheckpointError naming it."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (is {hf_dir} an HF model directory?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    return arch_from_hf_config(cfg, str(path))
