"""Load HF Qwen2.5-VL weights straight into this rank's Megatron stage (any TP/PP), and gather them back.

Each rank reads only the HF tensors its own parameters need (safetensors is memory-mapped), fuses them with
`HFMapping`, takes its TP shard with `split_for_tp` and copies it in place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pebr_mega.checkpoint.hf_io import HFWeights
from pebr_mega.checkpoint.hf_mapping import HFMapping, canonical_mcore_name, split_for_tp
from pebr_mega.errors import CheckpointError
from pebr_mega.models.arch import arch_from_hf_dir
from pebr_mega.models.config import ModelConfig


def _tp() -> tuple[int, int]:
    from megatron.core import parallel_state as mpu

    return mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()


def load_hf_weights(model, hf: str | Path | HFWeights, strict: bool = True,
                    on_param: Callable[[str], None] | None = None) -> None:
    """Copy HF weights into `model` (a `Qwen25VLModel` stage built for the current TP/PP layout).

    Missing tensors and shape mismatches are CheckpointErrors naming the tensor. With `strict` and a model
    that holds every layer (pp == 1), HF tensors nobody used are an error too. `on_param(name)` is
    called after each parameter (progress bars).
    """
    weights = hf if isinstance(hf, HFWeights) else HFWeights(hf)
    mapping = HFMapping(model.arch)
    shapes = mapping.expected_hf_shapes()
    tp_size, tp_rank = _tp()
    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        t = weights.get(name)
        if name in shapes and tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"{weights.dir}: tensor '{name}' has shape {tuple(t.shape)}, expected {shapes[name]}")
        used.add(name)
        return t

    with torch.no_grad():
        for local_name, param in model.named_parameters():
            name = canonical_mcore_name(model.global_name(local_name))
            shard = split_for_tp(name, mapping.hf_to_mcore_tensor(name, get), tp_size, tp_rank)
            if tuple(shard.shape) != tuple(param.shape):
                raise CheckpointError(f"{weights.dir}: '{name}' needs shape {tuple(param.shape)} on this rank, "
                                      f"the HF tensors {mapping.hf_names(name)} give {tuple(shard.shape)}")
            param.copy_(shard)
            if on_param is not None:
                on_param(name)
    full_model = model.pre_process and model.post_process
    if strict and full_model:
        used |= mapping.check_tied_lm_head(lambda n: weights.get(n) if n in weights else None)
        unused = sorted(set(weights.keys()) - used)
        if unused:
            raise CheckpointError(f"{weights.dir}: tensors not used by the model: {unused[:8]}"
                                  + (f" (+{len(unused) - 8} more)" if len(unused) > 8 else ""))


def build_from_hf(hf_dir: str | Path, cfg: ModelConfig, parallel_output: bool = True):
    """This rank's model stage for `cfg` (tp/pp as initialised by `init_parallel`), with the HF weights loaded."""
    from megatron.core import parallel_state as mpu

    from pebr_mega.models.qwen25_vl import build_model  # Megatron: this module loads without it (weights only)

    arch = arch_from_hf_dir(hf_dir)
    if (mpu.get_tensor_model_parallel_world_size(), mpu.get_pipeline_model_parallel_world_size()) != (cfg.tp, cfg.pp):
        raise ValueError(f"process groups are tp={mpu.get_tensor_model_parallel_world_size()} "
                         f"pp={mpu.get_pipeline_model_parallel_world_size()} but the config asks tp={cfg.tp} pp={cfg.pp}")
    model = build_model(arch, cfg, pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage(),
                        parallel_output=parallel_output)
    load_hf_weights(model, hf_dir)
    return model
