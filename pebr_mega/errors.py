"""Errors the user can act on. The CLI prints them as one line (no traceback) and exits with status 2."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator


class PebrError(Exception):
    """Base class of every error whose message tells the user what to fix."""


class DataError(PebrError):
    """A dataset file or record is unusable; the message names the file and, where known, the record."""


class ImageError(DataError):
    """An image is missing, unreadable, or outside the allowed size; the message names the file."""


class CheckpointError(PebrError):
    """A checkpoint is missing, incomplete or does not match the model; the message names the path/key."""


class BackendUnavailableError(PebrError):
    """A backend the user asked for by name cannot load; the message says why and how to install it."""


class OutputError(PebrError):
    """An output path would overwrite an input, a directory, or files pebr did not write; the message names it."""


class SettingsMismatchError(PebrError):
    """An output directory holds results made with other settings; the message names the differing keys."""


class StorageError(PebrError):
    """The disk refused a write or a read (no space, read-only, permission); the message names the path and the
    operation, and what is left on disk."""


# The OS errors a user meets on a training machine, in the words the message uses.
_OS_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOENT: "no such file or directory",
               errno.EISDIR: "is a directory", errno.ENOTDIR: "not a directory", errno.EIO: "input/output error",
               errno.EFBIG: "file too large"}


def describe_os_error(e: OSError, operation: str) -> str:
    """One line for an OS error: the operation, the path(s) and the reason with its errno name, e.g.
    `saving checkpoint step 3: /runs/x/checkpoints/.tmp-step_3/trainer_state.pt: no space left on the device
    (ENOSPC)`."""
    reason = _OS_REASONS.get(e.errno) or e.strerror or str(e) or type(e).__name__
    code = errno.errorcode.get(e.errno) if e.errno is not None else None
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    where = f"{' -> '.join(paths)}: " if paths else ""
    return f"{operation}: {where}{reason}{f' ({code})' if code else ''}"


_LOW_SPACE = 64 << 20  # below this many free bytes, a failed write is put down to a full disk


def storage_error(e: BaseException, operation: str, path: str | os.PathLike, after: str = "") -> StorageError | None:
    """The one-line `StorageError` for a write under `path` that failed with `e`, or None when it is not the
    disk's doing. An OSError speaks for itself; libraries that write through their own C++ or Rust writers
    (torch's zip writer: `unexpected pos 704 vs 598`; safetensors) turn a full disk into other exceptions, so
    those count as a full disk when the device holding `path` has (almost) no space left. `after`: what the user
    finds on disk (the last good state) and can do."""
    if isinstance(e, OSError) and e.errno is not None:
        message = describe_os_error(e, operation)
        if e.filename is None:
            message = f"{operation}: {path}: {message[len(operation) + 2:]}"
    else:
        free = _free_bytes(path)
        if free is None or free >= _LOW_SPACE:
            return None
        message = (f"{operation}: {path}: no space left on the device ({free} bytes free; the writer said: "
                   f"{str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})")
    return StorageError(f"{message}{'; ' + after if after else ''}")


@contextlib.contextmanager
def storage_errors(operation: str, path: str | os.PathLike, after: str | Callable[[], str] = "",
                   catch: tuple[type[BaseException], ...] = (Exception,),
                   cleanup: Callable[[], None] | None = None) -> Iterator[None]:
    """Around a write under `path`: an error of `catch` runs `cleanup` (the write's temporary), then becomes the
    one-line `StorageError` of `storage_error` when it is the disk's doing, else propagates as it is. `after`
    (or a function giving it, evaluated at the failure) says what is left on disk and what to do."""
    try:
        yield
    except catch as e:
        if cleanup is not None:
            cleanup()
        failure = storage_error(e, operation, path, after() if callable(after) else after)
        if failure is None:
            raise
        raise failure from None


def _free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the device holding `path` (its nearest existing parent), or None when unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None
