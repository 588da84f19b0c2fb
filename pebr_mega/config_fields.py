"""The bottom of the configuration layer: the error type and the field helpers every component's config uses.

Components declare their own config dataclasses next to their code and import only this module, so the
root tree (`pebr_mega.config`), which imports every component's config, sits above them without a cycle.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, Sequence

from pebr_mega.errors import PebrError


class ConfigError(PebrError, ValueError):
    """A configuration value the user wrote is invalid; the message names the key."""


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
