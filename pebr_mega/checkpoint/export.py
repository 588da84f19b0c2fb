"""Export a training model as a complete HF directory (weights, config, tokenizer, processor, templates).

Every stage of the recipe starts from and ends with such a directory, which is what the next stage,
`pebr eval`, `pebr infer` and VLMEvalKit read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pebr_mega.checkpoint.gather import iter_hf_tensors
from pebr_mega.checkpoint.hf_io import atomic_dir, copy_aux_files, write_safetensors
from pebr_mega.checkpoint.manifest import files_key, remember_intact, write_manifest
from pebr_mega.parallel.groups import barrier, is_main_rank


def export_to_hf(model, template_dir: str | Path, out_dir: str | Path,
                 write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model`'s current weights with `template_dir`'s non-weight files as an HF directory.

    `model` is this rank's stage (or its DDP wrapper, or the actor); `write_extra(dir)` adds the caller's own
    files (the trainers: the run's format prompt) before the directory is published. Collective (every rank
    iterates the weights); rank 0 writes, atomically.
    """
    tensors = iter_hf_tensors(model)
    if not is_main_rank():
        for _ in tensors:
            pass
        barrier()
        return Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp, ((n, t.detach().cpu()) for n, t in tensors))
        copy_aux_files(template_dir, tmp)
        if write_extra is not None:
            write_extra(tmp)
        write_manifest(tmp)  # last: what the readers of the export check it against
    # Just hashed: the next stage of this process (the pipeline) reads it without hashing 15 GB again.
    remember_intact(files_key(Path(out_dir).resolve()))
    barrier()
    return Path(out_dir)
