"""Megatron distributed checkpoints of Qwen2.5-VL: atomic save, load at any TP/PP, full-tensor streaming.

A checkpoint directory holds Megatron's `dist_checkpointing` files (global tensors, independent of the
TP/PP layout that wrote them), plus:
- `pebr_mcore.json`: format tag, the HF `config.json` (so the architecture is known without a template),
  the HF key style and dtype of the source, and the layout that saved it;
- `hf_template/`: the source's non-weight files (tokenizer, processor, chat template, generation config),
  so exporting back to HF needs no template directory;
- `MANIFEST.json` (a standalone checkpoint, `convert_hf_to_mcore`'s): every file's size and SHA-256, which its
  readers check first (`pebr_mega.checkpoint.manifest`).

Saves are atomic: all ranks write into `.NAME.tmp` beside the target, and rank 0 renames it into place after
a barrier (an existing checkpoint is moved aside first and deleted last). A crash mid-save leaves the last
good checkpoint untouched.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch

from pebr_mega.checkpoint.hf_io import copy_aux_files, replace_dir
from pebr_mega.checkpoint.hf_mapping import MC_LAYER, canonical_mcore_name
from pebr_mega.checkpoint.manifest import write_manifest
from pebr_mega.errors import CheckpointError
from pebr_mega.lifetime import install_checkpoint_writer_queue
from pebr_mega.models.arch import arch_from_hf_config
from pebr_mega.parallel.groups import barrier, is_main_rank

META_FILE = "pebr_mcore.json"
TEMPLATE_DIR = "hf_template"
FORMAT = "pebr-mcore/1"


def read_meta(ckpt_dir: str | Path) -> dict:
    """The `pebr_mcore.json` of a checkpoint; a missing or foreign directory is a CheckpointError."""
    path = Path(ckpt_dir) / META_FILE
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {ckpt_dir} was not written by pebr_mega.checkpoint")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def save_checkpoint(model, ckpt_dir: str | Path, meta: dict, template_dir: str | Path | None = None,
                    manifest: bool = False) -> Path:
    """Save `model` (this rank's stage) as a distributed checkpoint; collective over all ranks.

    `meta` must carry `hf_config` (the HF config dict); `template_dir`'s non-weight files are copied into
    `hf_template/` (rank 0). `manifest`: write its `MANIFEST.json` last, before it is published (a standalone
    checkpoint; one inside a training checkpoint is covered by that checkpoint's manifest).
    """
    from megatron.core import dist_checkpointing

    install_checkpoint_writer_queue()  # Megatron's writer would start a manager process that outlives a SIGKILL
    final = Path(ckpt_dir)
    tmp = final.parent / f".{final.name}.tmp"
    if is_main_rank():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
    barrier()
    if is_main_rank():
        from megatron.core import parallel_state as mpu

        record = {"format": FORMAT, **meta, "saved_tp": mpu.get_tensor_model_parallel_world_size(),
                  "saved_pp": mpu.get_pipeline_model_parallel_world_size()}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        if template_dir is not None:
            (tmp / TEMPLATE_DIR).mkdir()
            copy_aux_files(template_dir, tmp / TEMPLATE_DIR)
        if manifest:
            write_manifest(tmp)
        replace_dir(tmp, final)
    barrier()
    return final


def load_checkpoint(model, ckpt_dir: str | Path) -> dict:
    """Load a distributed checkpoint into `model` (this rank's stage, any TP/PP); collective. Returns the meta."""
    from megatron.core import dist_checkpointing

    meta = read_meta(ckpt_dir)

    saved_arch = arch_from_hf_config(meta["hf_config"], f"{ckpt_dir}/{META_FILE}")
    if saved_arch.text != model.arch.text or saved_arch.vision != model.arch.vision:
        raise CheckpointError(f"{ckpt_dir}: checkpoint architecture differs from the model's "
                              f"(checkpoint {saved_arch.text}, model {model.arch.text})")
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt_dir))
    except Exception as e:  # Megatron raises several exception types for missing keys and shape mismatches
        raise CheckpointError(f"{ckpt_dir}: cannot load into this model: {e}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return meta


# --------------------------------------------------------------------------------- full-tensor streaming
_STACKED = re.compile(r"^language_model\.decoder\.layers\.(?!\d)(.+)$")
_PER_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


def iter_full_tensors(ckpt_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical mcore name, full tensor) for every parameter.

    Works on any checkpoint this module wrote, whatever TP/PP saved it: Megatron stores global tensors, with
    the decoder layers either stacked on a leading axis (`decoder.layers.X` of shape [L, ...]) or one key per
    layer. Needs torch.distributed initialised (a single rank is enough).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    ckpt_dir = str(ckpt_dir)
    read_meta(ckpt_dir)
    metadata = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    plain, stacked, num_layers = {}, {}, None
    for key, sh in metadata.items():
        if not isinstance(sh, ShardedTensor):
            continue
        if _STACKED.match(key):
            stacked[key] = sh
            num_layers = sh.global_shape[0]
        else:
            plain[key] = sh

    def load(request: dict) -> dict:
        return dist_checkpointing.load(request, ckpt_dir, validate_access_integrity=False)

    def whole(keys) -> dict:
        return load({k: ShardedTensor.from_rank_offsets(k, torch.empty(metadata[k].global_shape, dtype=metadata[k].dtype),
                                                        replica_id=0) for k in keys})

    yield from _emit(whole(plain) if plain else {})
    # One stacked key ([L, ...], all layers of one parameter) at a time: Megatron's loader cannot read a
    # single layer slice in a one-rank world, so peak memory is the largest parameter summed over layers.
    for key in sorted(stacked):
        full = whole([key])[key]
        suffix = _STACKED.match(key).group(1)
        for i in range(num_layers):
            yield from _emit({f"{MC_LAYER}{i}.{suffix}": full[i]})
        del full


def _order(key: str) -> tuple:
    m = _PER_LAYER.match(key)
    return (1, int(m.group(1)), m.group(2)) if m else (0 if key.startswith("vision_model") else 2, 0, key)


def _emit(group: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    # Megatron's SwiGLU factory may store fc1's gate and up halves as `<key>_w` / `<key>_v`.
    for key in [k for k in group if k.endswith("linear_fc1.weight_w")]:
        group[key[:-2]] = torch.cat([group.pop(key), group.pop(key[:-2] + "_v")], dim=0)
    for key in sorted(group, key=_order):
        if not key.endswith("_extra_state"):
            yield canonical_mcore_name(key), group[key]
