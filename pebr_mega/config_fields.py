"""The bottom of the configuration layer: the error type and the field helpers every component's config uses.

Components declare their own config dataclasses next to their code and import only this module, so the
root tree (`pebr_mega.config`), which imports every component's config, sits above them without a cycle.
"""
from __future__ import annotations

import warnings
from dataclasses import field
from typing import Any, Sequence

from pebr_mega.errors import PebrError


class ConfigError(PebrError, ValueError):
    """A configuration value the user wrote is invalid; the message names the key."""


class ConfigWarning(UserWarning):
    """A configuration value that runs but is probably not what the user wants; the message names the key."""


def choice(default: Any, choices: Sequence[Any], help: str = "") -> Any:
    """A dataclass field restricted to `choices` (validated by `pebr_mega.config.load_config`)."""
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def check_fields(section: str, checks: dict[str, tuple[bool, Any, str]]) -> None:
    """Raise ConfigError for the first failed check; `checks` maps key -> (ok, value, what is required).

    The message names the dotted key (`section.key`), the value written and the rule, e.g.
    "config key 'rollout.n' = 0: must be >= 1".
    """
    for key, (ok, value, rule) in checks.items():
        if not ok:
            raise ConfigError(f"config key '{section}.{key}' = {value!r}: {rule}")


def warn_field(section: str, key: str, value: Any, why: str) -> None:
    """Warn (`ConfigWarning`) about a value that is allowed but probably unintended, naming the dotted key."""
    warnings.warn(f"config key '{section}.{key}' = {value!r}: {why}", ConfigWarning, stacklevel=3)


def positive(value: Any, what: str = "must be >= 1") -> tuple[bool, Any, str]:
    """The `check_fields` entry for a count that must be at least 1."""
    return (value is not None and value >= 1, value, what)


def optional_positive(value: Any) -> tuple[bool, Any, str]:
    """A count that is either None (resolved later from a preset) or at least 1."""
    return (value is None or value >= 1, value, "must be >= 1 (or unset for the stage's default)")
