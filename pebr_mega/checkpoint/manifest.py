"""Checkpoint manifests: what a checkpoint held when it was written, and the check every reader makes first.

`MANIFEST.json` lists the relative path, size and SHA-256 of every file below its directory; it is written
last, so its presence also says the directory is whole. Training checkpoints carry one (`step_N/`,
`pebr_mega.run.stage_checkpoints`), as do the Megatron checkpoints `convert_hf_to_mcore` writes and the HF
directories the exports write.

Every reader checks a checkpoint against the manifest of the directory that holds it before it loads a byte
(`verify_before_reading`): resume, export, conversion, evaluation, logit comparison. A reader may be given a
part of a checkpoint (`step_N/actor/model`): the nearest manifest above it is used, restricted to the files
below the path. A damaged one is refused with one line naming the file and what is wrong; the readers' override
(`--skip-verify`) reads it anyway, for forensics. Hashing reads every byte once more: files are read in 8 MiB
chunks and hashed on several threads (hashlib releases the GIL), so the cost is the disk's (or page cache's) read
bandwidth or one SHA-256 stream per core, whichever is lower (docs/PERFORMANCE.md, "Checkpoint verification"). A
directory is hashed at most once per process while none of its files changes (size and mtime).
"""
from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from pebr_mega.errors import CheckpointError
from pebr_mega.outputs import file_sha256, write_text_atomic

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "pebr-checkpoint-manifest/1"
NO_MANIFEST = f"no {MANIFEST}"
_CHUNK = 8 << 20
_MAX_DEPTH = 3  # how far above a path its manifest may be (step_N/actor/model -> step_N)
_verified: set[tuple] = set()  # `files_key`s (and the part checked) of what this process found intact


def _sha256(path: Path) -> str:
    return file_sha256(path, _CHUNK)


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def write_manifest(directory: str | Path) -> Path:
    """Write `directory/MANIFEST.json`: relative path, size and SHA-256 of every file below it (atomically)."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    with ThreadPoolExecutor(_threads()) as pool:
        digests = list(pool.map(_sha256, files))
    entries = [{"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": d}
               for p, d in zip(files, digests)]
    text = json.dumps({"format": MANIFEST_FORMAT, "files": entries}, indent=1) + "\n"
    return write_text_atomic(root / MANIFEST, text)


def verify_checkpoint(directory: str | Path, prefix: str = "",
                      selected: Callable[[str], bool] | None = None) -> str | None:
    """None when every file in the manifest (below `prefix`, and for which `selected(path)` holds, when given) is
    present with its size and checksum, else what is wrong (naming the file). A checkpoint without a manifest is
    reported as such (`NO_MANIFEST`)."""
    found = find_damage(directory, prefix, selected)
    return None if found is None else " ".join(x for x in found if x)


def find_damage(directory: str | Path, prefix: str = "",
                selected: Callable[[str], bool] | None = None) -> tuple[str, str] | None:
    """`verify_checkpoint`'s verdict as (the damaged file's relative path, what is wrong with it)."""
    root = Path(directory)
    if not (root / MANIFEST).is_file():
        return "", NO_MANIFEST
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        entries = manifest["files"]
        expected = {e["path"]: (int(e["size"]), str(e["sha256"])) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return MANIFEST, f"is unreadable ({type(e).__name__})"
    expected = {rel: v for rel, v in expected.items() if (not prefix or rel.startswith(prefix))
                and (selected is None or selected(rel))}
    for rel, (size, _) in expected.items():  # sizes first: cheap, and most damage changes them
        p = root / rel
        if not p.is_file():
            return rel, "is missing"
        if p.stat().st_size != size:
            return rel, f"is {p.stat().st_size} bytes, {size} expected"
    rels = list(expected)
    with ThreadPoolExecutor(_threads()) as pool:
        digests = list(pool.map(lambda rel: _sha256(root / rel), rels))
    for rel, digest in zip(rels, digests):
        if digest != expected[rel][1]:
            return rel, "does not match its checksum (its bytes changed after the save)"
    return None


def files_key(path: Path) -> tuple | None:
    """The directory and each file's relative path, size and mtime (None when unreadable)."""
    try:
        return (str(path), *sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                                   for f in path.rglob("*") if f.is_file()))
    except OSError:
        return None


def remember_intact(key: tuple | None) -> None:
    """Record that the files of `key` (`files_key`) were found intact (or just hashed into a manifest)."""
    if key is not None:
        _verified.add(key)


def known_intact(key: tuple | None) -> bool:
    """Whether this process found the files of `key` intact, none of them changed since."""
    return key is not None and key in _verified


def manifest_root(path: str | Path) -> Path | None:
    """The nearest directory at or above `path` (up to three levels) that holds a `MANIFEST.json`."""
    p = Path(path).resolve()
    for candidate in [p, *p.parents][:_MAX_DEPTH + 1]:
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def verify_before_reading(path: str | Path, what: str, skip: bool = False,
                          selected: Callable[[str], bool] | None = None) -> None:
    """Check the checkpoint (or part of one) at `path` against its manifest before it is read; `CheckpointError`
    naming the file when it is damaged. `skip` (the readers' `--skip-verify`) reads it anyway, saying so on
    stderr. A checkpoint without a manifest (written before they existed) is read with a warning on stderr.
    `selected`: the files (relative to the manifest's directory) that matter to this reader (an HF directory's
    weights, say); the rest are not checked."""
    if skip:
        print(f"warning: {what} {path}: not verified against its {MANIFEST} (--skip-verify)", file=sys.stderr)
        return
    root = manifest_root(path)
    if root is None:
        print(f"warning: {what} {path} has no {MANIFEST} (written before checkpoints were verified): reading it "
              "unverified", file=sys.stderr)
        return
    rel = Path(path).resolve().relative_to(root).as_posix()
    prefix = "" if rel == "." else rel + "/"
    key = files_key(root)
    # What was checked: the whole `prefix`, or only its `selected` files (then a later reader of the rest checks).
    whole = (*key, prefix, "all") if key is not None else None
    checked = whole if selected is None or key is None else (*key, prefix, "selected")
    if known_intact(key) or known_intact(whole) or known_intact(checked):
        return
    damage = find_damage(root, prefix, selected)
    if damage is not None:
        rel, why = damage
        raise CheckpointError(f"{what} {path} is damaged: {root / rel} {why} (checked against {root / MANIFEST}); "
                              "refusing to read it (--skip-verify reads it anyway, for forensics)")
    remember_intact(checked)
