"""Where commands write: outputs are checked against the command's inputs and against files pebr did not write.

Every command that writes claims its outputs first, before it loads anything:

- `claim_output_file(path, inputs)`: the path is not a directory, is not one of the inputs (same resolved
  path or the same file through a link), and, if it exists and is not empty, was written by pebr before.
- `claim_output_dir(path, inputs, writes)`: the path is not a file, is not an input and does not lie inside
  an input directory; none of the entries it will write (`writes`, names relative to it) is or holds an
  input; and, if it exists and is not empty, pebr created it. `check_output_dir` is that check alone (it
  changes nothing: a dry run asks it what the run would do).
- `check_replace_dir(out, sources, overwrite)`: for tools that replace a whole directory (export, convert):
  never the source, never inside it, never holding it; a non-empty directory only with `overwrite`.

One process at a time writes an output: `lock_output_dir(path)` (a run directory, a pipeline's work directory)
and `lock_beside(path)` (a file, or a directory that is replaced whole: the sampling output, an export) take an
exclusive lock on a lock file, `.pebr-lock` in the directory or `.<name>.pebr-lock` beside the path. The lock
file names its holder (pid, host, command); a second process is refused with an `OutputError` naming them. The
kernel releases the lock when the holder dies, however it dies, so a lock file left by a kill -9 never blocks a
rerun. A run directory's lock is held for the life of the process; a lock beside a path is released (and its
file removed) when the write is done. The lock is a POSIX record lock (`fcntl.lockf`), not `flock`: a `flock`
belongs to the open file, which a forked child shares, so the writer processes Megatron forks during a
checkpoint save kept a killed run's lock for as long as they lived and refused its rerun (seen in the kill
soak); a record lock belongs to the process alone. Its one rule: this process must not open and close the lock
file a second time while it holds the lock (closing any descriptor of it releases the lock), hence `_held`.

What pebr wrote is recorded in a marker file, `.pebr-output.json`, in the directory concerned: `{"dir": true}`
for a directory pebr created (a run, a synthetic dataset, a tiny model; the files in it count as pebr's), and
`"files": [...]` for single files pebr wrote into some other directory (filtered SFT records, evaluation
results, rollouts). A re-run into its own outputs therefore proceeds; anything else is refused with an
`OutputError` naming the path.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pebr_mega.errors import OutputError

MARKER = ".pebr-output.json"
LOCK = ".pebr-lock"
_held: dict[Path, int] = {}  # lock file -> descriptor, for the locks this process holds
PathLike = str | os.PathLike


def resolved(path: PathLike) -> Path:
    """`path` made absolute, with `~` expanded and symbolic links resolved (the path need not exist)."""
    return Path(path).expanduser().resolve()


def same_path(a: PathLike, b: PathLike) -> bool:
    """True when `a` and `b` name the same file or directory (by resolved path, or by inode when both exist)."""
    ra, rb = resolved(a), resolved(b)
    if ra == rb:
        return True
    try:
        return ra.exists() and rb.exists() and os.path.samefile(ra, rb)
    except OSError:
        return False


def is_within(inner: PathLike, outer: PathLike) -> bool:
    """True when `inner` is `outer` or lies somewhere below it (resolved paths)."""
    ri, ro = resolved(inner), resolved(outer)
    return ri == ro or ro in ri.parents


def _inputs(inputs: Iterable[PathLike | None]) -> list[Path]:
    return [Path(i) for i in inputs if i not in (None, "")]


def _read_marker(directory: Path) -> dict:
    try:
        data = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_marker(directory: Path, data: dict) -> None:
    write_text_atomic(directory / MARKER, json.dumps(data, indent=1, sort_keys=True) + "\n")


def written_by_pebr(path: PathLike) -> bool:
    """True when the marker of `path` (a directory) or of its folder (a file) says pebr wrote it; a file in a
    directory pebr created counts as pebr's."""
    p = resolved(path)
    if p.is_dir():
        return bool(_read_marker(p).get("dir"))
    marker = _read_marker(p.parent)
    return bool(marker.get("dir")) or p.name in marker.get("files", [])


def _temporary_prefix(name: str) -> str:
    """The start of the temporary's name `write_bytes_atomic` writes before it renames it to `name`."""
    return f".{name}."


_TEMPORARY_SUFFIX = ".tmp"


def _is_bookkeeping(name: str) -> bool:
    """pebr's own files in an output directory: the marker, the lock, and a marker another rank of the same job
    is writing right now (`write_bytes_atomic`'s temporary: the ranks of a job claim the directory at once)."""
    return name in (MARKER, LOCK) or (name.startswith(_temporary_prefix(MARKER)) and name.endswith(_TEMPORARY_SUFFIX))


def _is_empty(p: Path) -> bool:
    if p.is_dir():
        return all(_is_bookkeeping(child.name) for child in p.iterdir())
    return p.stat().st_size == 0


def _refuse_inputs(out: Path, label: str, inputs: Sequence[Path]) -> None:
    for i in inputs:
        if same_path(out, i):
            raise OutputError(f"{label} {out} is also an input ({i}); writing it would destroy the input: "
                              "choose another output path")


def claim_output_file(path: PathLike, inputs: Iterable[PathLike | None] = (), what: str = "output") -> Path:
    """Check that writing the file `path` destroys nothing (see the module docstring) and record it as pebr's.

    Creates the parent folder. Returns `path` as given. Raises `OutputError` naming the path.
    """
    p = Path(path)
    rp = resolved(p)
    if rp.is_dir():
        raise OutputError(f"{what} {p} is a directory; give the path of a file to write")
    _refuse_inputs(p, what, _inputs(inputs))
    if rp.exists() and not _is_empty(rp) and not written_by_pebr(rp):
        raise OutputError(f"{what} {p} already exists and was not written by pebr; move it away or choose "
                          "another path")
    rp.parent.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(rp.parent)
    files = set(marker.get("files", []))
    if rp.name not in files:
        marker["files"] = sorted(files | {rp.name})
        _write_marker(rp.parent, marker)
    return p


def check_output_dir(path: PathLike, inputs: Iterable[PathLike | None] = (), what: str = "output directory",
                     writes: Sequence[str] = ()) -> Path:
    """Check that writing into the directory `path` destroys nothing; reads only (`claim_output_dir` claims).

    `writes` lists the entries (files or folders, relative to `path`) the command will write or replace: an
    input that is one of them, or lies inside one, is refused. Returns `path` as given; raises `OutputError`
    naming the path.
    """
    p = Path(path)
    rp = resolved(p)
    ins = _inputs(inputs)
    if rp.exists() and not rp.is_dir():
        raise OutputError(f"{what} {p} is a file, not a directory")
    for i in ins:
        if same_path(rp, i) or (resolved(i).is_dir() and is_within(rp, i)):
            raise OutputError(f"{what} {p} is or lies inside the input {i}; choose an output directory "
                              "outside it")
        for name in writes:
            if is_within(i, rp / name):
                raise OutputError(f"{what} {p}: the input {i} would be overwritten by {p / name}; choose "
                                  "another output directory")
    if rp.is_dir() and not _is_empty(rp) and not written_by_pebr(rp):
        raise OutputError(f"{what} {p} already exists, is not empty and was not created by pebr (no {MARKER}); "
                          "choose a new or empty directory")
    return p


def claim_output_dir(path: PathLike, inputs: Iterable[PathLike | None] = (), what: str = "output directory",
                     writes: Sequence[str] = ()) -> Path:
    """Check that writing into the directory `path` destroys nothing (`check_output_dir`), create it and mark
    it as pebr's. Returns `path` as given; raises `OutputError` naming the path."""
    p = check_output_dir(path, inputs, what, writes)
    rp = resolved(p)
    rp.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(rp)
    if not marker.get("dir"):
        marker["dir"] = True
        _write_marker(rp, marker)
    return p


def check_replace_dir(out: PathLike, sources: Iterable[PathLike | None], overwrite: bool = False,
                      what: str = "--out") -> None:
    """Check that replacing the whole directory `out` is safe: it is not a source, does not hold one and does
    not lie inside one (whatever `overwrite` says), and is absent or empty unless `overwrite`."""
    ro = resolved(out)
    for s in _inputs(sources):
        if same_path(ro, s) or is_within(ro, s) or is_within(s, ro):
            raise OutputError(f"{what} {out} is, holds or lies inside the source {s}; replacing it would destroy "
                              "the source: choose another output directory")
    if ro.exists() and not ro.is_dir():
        raise OutputError(f"{what} {out} is a file, not a directory")
    if ro.is_dir() and not _is_empty(ro) and not overwrite:
        raise OutputError(f"{what} {out} exists and is not empty; pass --overwrite to replace it, or choose "
                          "another directory")


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and a rename: a reader, a run killed mid-write or a
    power loss sees the old content or the new one, never a part. The temporary has a unique name (two writers
    never share one), is flushed to the disk before the rename, and the folder after it, so the rename itself
    survives a crash. Every small atomic write of the package (markers, manifests, records, metrics cut-backs,
    images taken out of data files) goes through here."""
    with _atomic_file(path, "wb") as f:
        f.write(data)
    return Path(path)


def file_sha256(path: PathLike, chunk: int = 8 << 20) -> str:
    """The SHA-256 of a file's bytes, read in `chunk`-byte blocks (the one file hash of the package: checkpoint
    manifests and run fingerprints both use it)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_text_file(path: PathLike) -> AbstractContextManager:
    """A text file (UTF-8) written in the `with` block and put in place at its end as `write_bytes_atomic` puts
    one: for files written as they are produced (sampled rollouts), too large to hold in memory first. An
    exception leaves `path` as it was."""
    return _atomic_file(path, "w")


@contextmanager
def _atomic_file(path: PathLike, mode: str) -> Iterator:
    """The file opened in `mode` ("w" or "wb") on a unique temporary beside `path`; at the block's end flushed to
    the disk, renamed to `path`, the folder flushed; on an exception the temporary is removed."""
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(p.name), suffix=_TEMPORARY_SUFFIX, dir=p.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(p.parent)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk; file systems that cannot are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: PathLike, text: str) -> Path:
    """`write_bytes_atomic` of `text` in UTF-8."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def plot_path(out: PathLike | None, default: PathLike, name: str = "curves.png") -> Path:
    """The file a command writes: `default` when `out` is None, `out/name` when `out` is a directory (existing,
    or written with a trailing separator), else `out` itself."""
    if out is None:
        return Path(default)
    if Path(out).is_dir() or str(out).endswith((os.sep, "/")):
        return Path(out) / name
    return Path(out)


# ---------------------------------------------------------------------------------------------- locks
def _holder_of(lock_file: Path) -> str:
    """Who holds `lock_file`, as its holder wrote it ("pid 123 on host h, `pebr train`, since ...")."""
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on host {info['host']} (`{info['command']}`, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['since']))})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


def _command_name() -> str:
    """What this process is, for the holder's line: `pebr train`, or the script (`export_to_hf.py`)."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if script in ("pebr", "__main__.py", "-c", "-m"):
        return " ".join(["pebr", *sys.argv[1:2]])
    return script


def _still_there(fd: int, lock_file: Path) -> bool:
    """Whether the descriptor `fd` is the file now at `lock_file` (not one removed since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(lock_file))
    except FileNotFoundError:
        return False


def _acquire(lock_file: Path, what: str, target: Path) -> int | None:
    """Take the exclusive lock of `lock_file` for this process (None when it already holds it); raise
    `OutputError` naming the holder when another process does."""
    lock_file = resolved(lock_file)
    if lock_file in _held:
        if _still_there(_held[lock_file], lock_file):
            return None
        os.close(_held.pop(lock_file))  # its directory was removed and made anew (a restart): lock the new file
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise OutputError(f"{what} {target} is in use by {_holder_of(lock_file)}; wait for it to finish, or "
                              "choose another path") from None
        # The holder before us may have removed the file between our open and our lock (`lock_beside`): a lock
        # on a removed file protects nothing, so take the lock of the file that is there now.
        if _still_there(fd, lock_file):
            break
        os.close(fd)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": _command_name()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _held[lock_file] = fd
    return fd


def lock_output_dir(path: PathLike, what: str = "output directory") -> Path:
    """Hold the lock of the directory `path` (its `.pebr-lock`) until this process ends; `OutputError` naming
    the holder when another process holds it. Idempotent within a process. Multi-rank jobs call it on rank 0
    alone (the ranks of one job are several processes)."""
    p = resolved(path)
    _acquire(p / LOCK, what, Path(path))
    return Path(path)


@contextmanager
def lock_beside(path: PathLike, what: str = "output") -> Iterator[Path]:
    """Hold the lock of `path` (a file, or a directory replaced whole) in the block: `.<name>.pebr-lock` beside it,
    removed at the end. `OutputError` naming the holder when another process holds it."""
    p = resolved(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lock_file = p.parent / f".{p.name}.pebr-lock"
    fd = _acquire(lock_file, what, Path(path))
    try:
        yield Path(path)
    finally:
        if fd is not None:  # removed while held, so a process that opened it before takes the new file's lock
            lock_file.unlink(missing_ok=True)
            _held.pop(lock_file, None)
            os.close(fd)
