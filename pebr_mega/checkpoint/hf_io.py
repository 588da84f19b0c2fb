"""Reading and writing HF model directories: lazy safetensors access, sharded writes, aux files, atomic dirs."""
from __future__ import annotations

import json
import os
import signal
import shutil
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from pebr_mega.checkpoint.hf_mapping import normalize_hf_name
from pebr_mega.errors import CheckpointError
from pebr_mega.checkpoint.manifest import MANIFEST, verify_before_reading
from pebr_mega.outputs import LOCK, MARKER

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class HFWeights:
    """Lazy, name-normalised access to the safetensors files of an HF model directory."""

    def __init__(self, hf_dir: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: HF model directory not found")
        files = self._files()
        self._where: dict[str, tuple[Path, str]] = {}
        self._handles = {}
        for f in files:
            try:
                h = safe_open(str(f), "pt")
            except Exception as e:
                raise CheckpointError(f"{f}: cannot open safetensors file ({e})") from None
            self._handles[f] = h
            for key in h.keys():
                self._where[normalize_hf_name(key)] = (f, key)
        self.key_style = "transformers5" if any(k.startswith("model.language_model.") for _, k in self._where.values()) else "qwen"

    def _files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            files = [self.dir / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) that do not exist: {missing}")
            return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no *.safetensors weights (only safetensors checkpoints are supported)")
        return files

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return normalize_hf_name(name) in self._where

    def get(self, name: str) -> torch.Tensor:
        """The tensor `name` (normalised HF name); a missing key is a CheckpointError naming it."""
        n = normalize_hf_name(name)
        if n not in self._where:
            raise CheckpointError(f"{self.dir}: HF checkpoint has no tensor '{name}'")
        f, key = self._where[n]
        return self._handles[f].get_tensor(key)

    def shape(self, name: str) -> tuple[int, ...]:
        f, key = self._where[normalize_hf_name(name)]
        return tuple(self._handles[f].get_slice(key).get_shape())

    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point weights (the most common one, by tensor count; read from headers)."""
        names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
        counts: dict[torch.dtype, int] = {}
        for f, key in self._where.values():
            d = names.get(self._handles[f].get_slice(key).get_dtype())
            if d is not None:
                counts[d] = counts.get(d, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32


def is_weight_file(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) or path.name in WEIGHT_INDEXES


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy every non-weight file (config, tokenizer, processor, chat template, generation config, ...), but not
    what describes `src` itself, not a copy: the record of what pebr wrote (`pebr_mega.outputs.MARKER`), its
    lock file and its `MANIFEST.json`."""
    src, dst = Path(src), Path(dst)
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not is_weight_file(p) and p.name not in (MARKER, LOCK, MANIFEST):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def write_safetensors(out_dir: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                      max_shard_bytes: int = 5 * 2**30, progress=None) -> list[str]:
    """Write (name, tensor) pairs as HF safetensors shards (+ index when more than one); returns file names.

    Tensors are consumed one by one and a shard is flushed when it would exceed `max_shard_bytes`, so memory
    stays near one shard.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    tmp_names: list[str] = []

    def flush() -> None:
        name = f"shard-{len(tmp_names):05d}.tmp.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        tmp_names.append(name)

    weight_map_tmp: dict[str, int] = {}
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().cpu().contiguous()
        weight_map_tmp[name] = len(shards) - 1
        size += nbytes
        if progress is not None:
            progress.update(1)
    flush()
    for name in tmp_names:
        give_default_mode(out / name)
    total = len(tmp_names)
    if total == 1:
        os.replace(out / tmp_names[0], out / "model.safetensors")
        return ["model.safetensors"]
    finals = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    for tmp, final in zip(tmp_names, finals):
        os.replace(out / tmp, out / final)
    total_size = sum((out / f).stat().st_size for f in finals)
    index = {"metadata": {"total_size": total_size}, "weight_map": {n: finals[i] for n, i in sorted(weight_map_tmp.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return finals


def give_default_mode(path: Path) -> None:
    """Give a file the mode every other file gets (0666 less the umask: 0644 by default). safetensors creates
    its files 0600, so an exported model's weights were readable by their owner alone while its config and
    tokenizer were readable by all."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _stale_temporaries(final: Path) -> list[Path]:
    """Temporary directories of earlier writes of `final` that a kill left behind."""
    return [p for p in final.parent.glob(f".{final.name}.tmp-*") if p.is_dir()]


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in the block (as Ctrl-C does), so the block's clean-up runs; Python's own
    default would end the process without it. Main thread only (where Python delivers signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, _frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final`; on success it replaces `final` by renames.

    A crash before the end leaves `final` untouched (the temp dir is removed on an exception). When `final`
    exists it is renamed aside first and deleted only after the new directory is in place. Ctrl-C or SIGTERM
    inside the block removes the temporary directory and says so on stderr (then the KeyboardInterrupt goes
    on); temporaries a kill -9 left beside `final` are removed when the next write of `final` starts (the
    caller holds `final`'s output lock, `pebr_mega.outputs`, so no other process is writing one).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temporaries(final):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _sigterm_raises():
            yield tmp
    except KeyboardInterrupt as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"interrupted ({e or 'SIGINT'}) while writing {final}: removed its temporary directory {tmp}; "
              f"{final} is as it was", file=sys.stderr)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(new: Path, final: Path) -> None:
    """Rename `new` to `final`, moving an existing `final` aside first and deleting it afterwards."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{int(time.time())}-{uuid.uuid4().hex[:6]}"
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_hf_model_dir(path: str | Path, what: str = "model", verify: bool = True) -> Path:
    """Check, before anything loads it, that `path` is a readable HF model directory; returns it as a Path.

    Everything is read from local directories (nothing is downloaded), so a missing path is reported as such,
    not as a failed connection to the Hub. Every JSON file must parse, `config.json` must be an object and every
    safetensors file must open (its header is read: a truncated, emptied or garbage file fails here). A directory
    pebr exported carries a `MANIFEST.json`: its weight files are checked against it (`verify`; the other files
    are the user's to edit). Raises `CheckpointError` naming the file.
    """
    p = Path(path) if path else None
    if p is None:
        raise CheckpointError(f"{what} is not set: give a local HF model directory")
    if not p.exists():
        raise CheckpointError(f"{what} {p}: directory does not exist (models are read from local directories, "
                              "never downloaded)")
    if not p.is_dir():
        raise CheckpointError(f"{what} {p} is a file, not an HF model directory")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{what} {p} is not an HF model directory (no config.json)")
    for f in sorted(p.glob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{f} is not valid JSON (not UTF-8 text: {e.reason})") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{f} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if f.name == "config.json" and not isinstance(data, dict):
            raise CheckpointError(f"{f} must hold a JSON object, not a {type(data).__name__}")
    verify_hf_weights(p, what, skip=not verify)
    HFWeights(p)
    return p


def verify_hf_weights(path: str | Path, what: str, skip: bool = False) -> None:
    """Check the weight files of an HF directory pebr exported (it has a `MANIFEST.json`) against that manifest;
    the other files (config, generation config, templates) are the user's to edit. A directory without one
    (an HF download) is not checked. `CheckpointError` naming the damaged file."""
    if (Path(path) / MANIFEST).is_file():
        verify_before_reading(path, what, skip=skip, selected=lambda rel: "/" not in rel and is_weight_file(Path(rel)))
