"""HF directory <-> Megatron distributed checkpoint, exact in both directions.

- `convert_hf_to_mcore(hf_dir, out_dir)`: builds the model at TP=1/PP=1 in the checkpoint's own dtype
  (so no value is rounded), loads the HF tensors through `HFMapping`, saves a distributed checkpoint
  (loadable at any TP/PP) with the HF config and non-weight files recorded beside it.
- `export_mcore_to_hf(mcore_dir, out_dir, hf_template=None)`: streams the checkpoint's global tensors one
  layer at a time, maps them back to HF names and layouts, writes sharded safetensors, and copies the
  non-weight files from `hf_template` (default: the copy recorded at conversion time).

Both run in one process (a single-rank gloo group is created when torch.distributed is not initialised),
write into a temporary sibling of the output and rename it into place, and show tqdm progress. Neither
replaces its own source (the output may not be, hold or lie inside the source), nor a non-empty output
directory unless `overwrite` (`pebr_mega.outputs.check_replace_dir`).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from pebr_mega.checkpoint.dist import TEMPLATE_DIR, iter_full_tensors, read_meta, save_checkpoint
from pebr_mega.checkpoint.hf_io import HFWeights, atomic_dir, copy_aux_files, verify_hf_weights, write_safetensors
from pebr_mega.checkpoint.hf_load import load_hf_weights
from pebr_mega.checkpoint.manifest import verify_before_reading, write_manifest
from pebr_mega.checkpoint.hf_mapping import MC_VISION, HFMapping
from pebr_mega.errors import CheckpointError
from pebr_mega.models.arch import arch_from_hf_config, arch_from_hf_dir
from pebr_mega.models.config import ModelConfig
from pebr_mega.models.qwen25_vl import build_model
from pebr_mega.models.vision import VisionTower
from pebr_mega.outputs import check_replace_dir
from pebr_mega.parallel.cpu_compat import megatron_on_cpu
from pebr_mega.parallel.groups import destroy_parallel, init_parallel
from pebr_mega.parallel.launch import free_port

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@contextmanager
def single_rank_world():
    """A one-rank gloo world with Megatron's TP=1/PP=1 groups (or the caller's, if it is one rank already)."""
    owned = not dist.is_initialized()
    if not owned and dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in a single process; call it outside a multi-rank job")
    if owned:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    with megatron_on_cpu:  # the conversion's Megatron calls (build, load, dist-checkpoint save) run inside
        init_parallel(1, 1, backend="gloo" if owned else None)
        try:
            yield
        finally:
            destroy_parallel(process_group=owned)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, dynamic_ncols=True)


def convert_hf_to_mcore(hf_dir: str | Path, out_dir: str | Path, progress: bool = True,
                        overwrite: bool = False, verify: bool = True) -> Path:
    """Write a Megatron distributed checkpoint of the HF Qwen2.5-VL in `hf_dir` to `out_dir`, with its manifest.

    A non-empty `out_dir` is replaced only with `overwrite`; one that is, holds or lies inside `hf_dir` never.
    An `hf_dir` that pebr exported is checked against its manifest first (`verify`).
    """
    check_replace_dir(out_dir, [hf_dir], overwrite)
    verify_hf_weights(hf_dir, "--hf-dir", skip=not verify)
    hf_dir = Path(hf_dir)
    arch = arch_from_hf_dir(hf_dir)
    weights = HFWeights(hf_dir)
    dtype = weights.dtype()
    cfg = ModelConfig(spec="torch", params_dtype=_DTYPE_NAMES.get(dtype, "float32"))
    hf_config = json.loads((hf_dir / "config.json").read_text())
    with single_rank_world():
        # Built on CPU even on a GPU machine: conversion is I/O bound and must not need GPU memory.
        model = build_model(arch, cfg, use_cpu_initialization=True)
        bar = _progress(len(list(model.parameters())), "HF -> Megatron", progress)
        load_hf_weights(model, weights, on_param=lambda name: bar.update(1))
        bar.close()
        meta = {"hf_config": hf_config, "hf_key_style": weights.key_style, "dtype": cfg.params_dtype,
                "source": str(hf_dir.resolve()),
                # a tied checkpoint that nevertheless stores lm_head.weight gets it back on export
                "hf_stores_tied_lm_head": arch.text.tie_word_embeddings and "lm_head.weight" in weights}
        out = save_checkpoint(model, out_dir, meta, template_dir=hf_dir, manifest=True)
    if progress:
        print(f"wrote Megatron checkpoint {out} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")
    return out


def export_mcore_to_hf(mcore_dir: str | Path, out_dir: str | Path, hf_template: str | Path | None = None,
                       progress: bool = True, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                       verify: bool = True) -> Path:
    """Write a complete HF model directory (weights + config + tokenizer + processor + templates).

    A non-empty `out_dir` is replaced only with `overwrite`; one that is, holds or lies inside the checkpoint
    or the template never. The checkpoint is checked against its manifest first (`verify`; a damaged one is a
    CheckpointError naming the file), and the export gets its own.
    """
    check_replace_dir(out_dir, [mcore_dir, hf_template], overwrite)
    verify_before_reading(mcore_dir, "--mcore-dir", skip=not verify)
    mcore_dir = Path(mcore_dir)
    meta = read_meta(mcore_dir)
    template = Path(hf_template) if hf_template is not None else mcore_dir / TEMPLATE_DIR
    if not template.is_dir():
        raise CheckpointError(f"{template}: HF template directory not found (pass --hf-template)")
    config_path = template / "config.json"
    hf_config = json.loads(config_path.read_text()) if config_path.is_file() else meta["hf_config"]
    arch = arch_from_hf_config(meta["hf_config"], f"{mcore_dir}/pebr_mcore.json")
    if arch_from_hf_config(hf_config, str(config_path)).text != arch.text:
        raise CheckpointError(f"{config_path}: template architecture differs from the checkpoint's")
    mapping = HFMapping(arch)
    expected = set(mapping.mcore_names()) | vision_mcore_names(arch)
    seen: set[str] = set()

    def hf_tensors(bar):
        with single_rank_world():
            for name, tensor in iter_full_tensors(mcore_dir):
                if name not in expected:
                    if name == "language_model.output_layer.weight" and arch.text.tie_word_embeddings:
                        continue
                    raise CheckpointError(f"{mcore_dir}: unexpected tensor '{name}' for this architecture")
                seen.add(name)
                for hf_name, t in mapping.mcore_to_hf_tensors(name, tensor):
                    yield _style(hf_name, meta.get("hf_key_style", "qwen")), t
                    if hf_name == "model.embed_tokens.weight" and meta.get("hf_stores_tied_lm_head"):
                        yield "lm_head.weight", t.clone()
                bar.update(1)

    with atomic_dir(out_dir) as tmp:
        bar = _progress(len(expected), "Megatron -> HF", progress)
        files = write_safetensors(tmp, hf_tensors(bar), max_shard_bytes=max_shard_bytes)
        bar.close()
        missing = sorted(expected - seen)
        if missing:
            raise CheckpointError(f"{mcore_dir}: checkpoint lacks tensors {missing[:5]}")
        copy_aux_files(template, tmp)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        write_manifest(tmp)  # last: what the readers of the export check it against
    if progress:
        print(f"wrote HF model {out_dir} ({len(files)} safetensors file(s))")
    return Path(out_dir)


def vision_mcore_names(arch) -> set[str]:
    """mcore names of the vision tower's parameters (built on the meta device: no memory)."""
    with torch.device("meta"):
        tower = VisionTower(arch.vision)
    return {MC_VISION + n for n, _ in tower.named_parameters()}


def _style(hf_name: str, style: str) -> str:
    """Write names as the source checkpoint spelled them (on-disk Qwen names or transformers 5 names)."""
    if style != "transformers5":
        return hf_name
    if hf_name.startswith("model."):
        return "model.language_model." + hf_name[len("model."):]
    if hf_name.startswith("visual."):
        return "model." + hf_name
    return hf_name
