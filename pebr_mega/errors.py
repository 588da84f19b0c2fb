"""Errors the user can act on. The CLI prints them as one line (no traceback) and exits with status 2."""
from __future__ import annotations


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
