"""`ModelConfig`: how the Megatron Qwen2.5-VL is built (backend spec, precision, parallel layout, recompute).

The architecture itself (sizes, heads, token ids) is not configured here: it is read from the HF
`config.json` (`pebr_mega.models.arch`). Fields with `metadata["choices"]` are validated by the config
loader (`pebr_mega.config.load_config`); the cross-field rules by `__post_init__`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pebr_mega.config_fields import check_fields, choice, positive


DTYPES = ("float32", "bfloat16", "float16")
FP8_TOKEN_MULTIPLE = 16


def token_multiple(tp: int = 1, sequence_parallel: bool = False) -> int:
    """What the token count of a packed row is padded to a multiple of: 16 (FP8 GEMMs), times TP under sequence
    parallelism, else lcm(16, TP); why: `pebr_mega.models.packing`. Here, importable without Megatron, so that
    the planner and the start-up checks (`pebr_mega.plan`) use the packer's very rule."""
    if sequence_parallel:
        return FP8_TOKEN_MULTIPLE * tp
    return math.lcm(FP8_TOKEN_MULTIPLE, tp)


@dataclass
class ModelConfig:
    """Build options of the Megatron model; the architecture comes from the HF checkpoint."""

    spec: str = choice("auto", ("auto", "te", "torch", "local"),
                        "layer spec: te (Transformer Engine), torch (SDPA attention), local; auto = te if present")
    fp8: str = choice("none", ("none", "hybrid", "e4m3"), "FP8 recipe (te spec only)")
    tp: int = 1
    pp: int = 1
    params_dtype: str = choice("bfloat16", DTYPES, "dtype of parameters and activations")
    sequence_parallel: bool = False
    recompute_granularity: str = choice("none", ("none", "selective", "full"), "activation recompute")
    recompute_method: str = choice("uniform", ("uniform", "block"), "how full recompute picks layers")
    recompute_num_layers: int = 1
    vision_recompute: bool = False
    attention: str = choice("auto", ("auto", "varlen", "flash_attn", "sdpa"),
                            "packed attention of the torch spec and the ViT (pebr_mega.models.attention): "
                            "auto = flash_attn or torch's varlen on CUDA in bf16/fp16, else one padded SDPA call")

    def __post_init__(self) -> None:
        te = self.spec in ("te", "auto")
        check_fields("model", {
            "tp": positive(self.tp),
            "pp": positive(self.pp),
            "recompute_num_layers": positive(self.recompute_num_layers),
            "fp8": (self.fp8 == "none" or te, self.fp8, f"needs model.spec=te (got {self.spec!r})"),
            "sequence_parallel": (not self.sequence_parallel or (self.spec != "local" and self.tp > 1),
                                  self.sequence_parallel, "needs model.spec=te or torch (Megatron's local spec builds "
                                  "WrappedTorchNorm, which refuses sequence parallelism) and model.tp > 1"),
            "params_dtype": (self.params_dtype in DTYPES, self.params_dtype, f"must be one of {list(DTYPES)}"),
        })

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.params_dtype)
