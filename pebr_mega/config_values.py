"""How a value written in a config file or on the command line becomes its key's type.

YAML 1.1, which OmegaConf speaks, guesses a scalar's type from its text: `0123` is octal 83, `2024_01` is
202401, `12:30` is sexagesimal 750, `yes` is True and `1e3` is 1000.0. For a key typed as a string that
guess rewrites what the user wrote (`run.output_dir=0123` would write into `83`). Here the key's declared
type decides instead, from the text as written:

- `str`: the text exactly as written. A value in matching quotes (`'off'`, `"a b"`) is the text inside, as
  YAML reads a quoted scalar (the way to write a string that starts or ends with a space, or `null` for an
  optional key).
- `int`: decimal digits with an optional sign (and Python's `_` between digits); `1e3`, `1.0`, `12:30`,
  `0x10` are errors.
- `float`: a decimal number with optional exponent (`1e-6`, `.5`, `3`), or `inf` / `nan` (also YAML's
  `.inf` / `.nan`); `12:30` is an error.
- `bool`: `true`/`false`, `yes`/`no`, `on`/`off`, `y`/`n`, `1`/`0`, in any case.
- an optional key (`str | None`, `int | None`, ...): `null`, `~` or nothing (unquoted) is None.
- `list[T]` and `dict[str, T]`: YAML flow syntax (`[a, b]`, `{k: 1}`), each element read as `T` by the
  rules above.

A value that does not fit is a `ConfigError` naming the key, the value and the expected type. Keys of
untyped mappings (`rollout.sglang_args.*`) and interpolations (`${...}`, resolved by OmegaConf later) keep
OmegaConf's own reading. The same rules apply to the scalars of a YAML config file (read from the file's
text), so a file and the command line never disagree about a value.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from pebr_mega.config_fields import ConfigError

__all__ = ["override_layer", "typed_file_layer", "key_hint", "value_from_text"]

NULL_TEXTS = frozenset({"", "~", "null", "Null", "NULL"})  # YAML's spellings of null (unquoted)
_TRUE = frozenset({"true", "yes", "on", "y", "1"})
_FALSE = frozenset({"false", "no", "off", "n", "0"})
_INT = re.compile(r"[+-]?\d+(_\d+)*")
_FLOAT = re.compile(r"[+-]?(\d+(_\d+)*(\.(\d+(_\d+)*)?)?|\.\d+(_\d+)*)([eE][+-]?\d+)?")
_FLOAT_SPECIAL = {"inf": "inf", ".inf": "inf", "infinity": "inf", "nan": "nan", ".nan": "nan"}
_TYPE_NAMES = {str: "a string", int: "an integer (int)", float: "a number (float)",
               bool: "a boolean (true/false, yes/no, on/off, 1/0)"}


# ---------------------------------------------------------------------------------------------- key types
def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None` / `Optional[X]`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(hint)):
            return args[0], True
    return hint, False


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    # Cached: the annotations are strings (`from __future__ import annotations`), evaluated once per class.
    return typing.get_type_hints(cls)


def key_hint(schema: type, dotted: str) -> Any | None:
    """The declared type of `dotted` in the dataclass tree `schema` (a value type of a typed `dict[str, T]`
    field for `field.key`), or None when the key is unknown, untyped or addresses a whole section."""
    node: Any = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(node):
            hints = _field_hints(node)
            if part not in hints:
                return None  # unknown: the merge reports it with the valid keys
            node = hints[part]
        elif typing.get_origin(node) is dict and len(typing.get_args(node)) == 2:
            node = typing.get_args(node)[1]
        else:
            return None
        if i == len(parts) - 1:
            return None if dataclasses.is_dataclass(node) else node
    return None


# ---------------------------------------------------------------------------------------------- scalars
def _error(key: str, source: str, text: str, expected: str) -> ConfigError:
    return ConfigError(f"config key '{key}' in {source}: {text!r} is not {expected}")


def _scalar(text: str, kind: type, key: str, source: str) -> Any:
    """`text` read as `kind` (str, int, float or bool) by the module's rules, else a `ConfigError`."""
    if kind is str:
        return text
    t = text.strip()
    if kind is bool:
        if t.lower() in _TRUE | _FALSE:
            return t.lower() in _TRUE
    elif kind is int:
        if _INT.fullmatch(t):
            return int(t)
    elif kind is float:
        sign, body = ("-", t[1:]) if t[:1] == "-" else ("", t[1:] if t[:1] == "+" else t)
        if body.lower() in _FLOAT_SPECIAL:
            return float(sign + _FLOAT_SPECIAL[body.lower()])
        if _FLOAT.fullmatch(t):
            return float(t)
    raise _error(key, source, text, _TYPE_NAMES[kind])


def value_from_text(text: str, hint: Any, key: str, source: str, quoted: bool = False) -> Any:
    """One scalar written as `text` (`quoted`: it was in quotes, so never null) read as the key's type `hint`.

    Types this module does not read (Any, a bare dict, nested containers) return `text` unchanged.
    """
    kind, optional = _unwrap_optional(hint)
    if optional and not quoted and text.strip() in NULL_TEXTS:
        return None
    if kind in _TYPE_NAMES:
        return _scalar(text, kind, key, source)
    return text


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _element_hint(hint: Any) -> tuple[str, Any] | None:
    """('list', T) for list[T], ('dict', T) for dict[str, T], else None."""
    kind, _ = _unwrap_optional(hint)
    args = typing.get_args(kind)
    if typing.get_origin(kind) is list and len(args) == 1:
        return "list", args[0]
    if typing.get_origin(kind) is dict and len(args) == 2:
        return "dict", args[1]
    return None


def _readable(hint: Any) -> bool:
    """Whether this module reads values of type `hint` (str, int, float, bool, list[T], dict[str, T])."""
    return _unwrap_optional(hint)[0] in _TYPE_NAMES or _element_hint(hint) is not None


def _retype(value: Any, node: yaml.Node, hint: Any, key: str, source: str) -> Any:
    """`value` (what YAML made of `node`) re-read from `node`'s text by the declared type `hint`.

    Walks sections (dataclasses), `list[T]` and `dict[str, T]`; shapes that do not match the schema are
    left for the shape check and the merge to report.
    """
    if _is_interpolation(value):
        return value  # OmegaConf resolves it later, against the key's type
    if dataclasses.is_dataclass(hint):
        if isinstance(node, yaml.MappingNode) and isinstance(value, dict):
            hints = _field_hints(hint)
            for knode, vnode in node.value:
                name = knode.value
                if name in hints and name in value:
                    value[name] = _retype(value[name], vnode, hints[name], f"{key}.{name}".lstrip("."), source)
        return value
    element = _element_hint(hint)
    if element is not None:
        shape, inner = element
        if shape == "list" and isinstance(node, yaml.SequenceNode) and isinstance(value, list) \
                and len(node.value) == len(value):
            return [_retype(v, n, inner, f"{key}[{i}]", source) for i, (v, n) in enumerate(zip(value, node.value))]
        if shape == "dict" and isinstance(node, yaml.MappingNode) and isinstance(value, dict):
            for knode, vnode in node.value:
                if knode.value in value:
                    value[knode.value] = _retype(value[knode.value], vnode, inner, f"{key}.{knode.value}", source)
        return value
    if isinstance(node, yaml.ScalarNode):
        kind, _ = _unwrap_optional(hint)
        if kind in _TYPE_NAMES:
            return value_from_text(node.value, hint, key, source, quoted=node.style in ("'", '"'))
    return value


# ---------------------------------------------------------------------------------------------- layers
def _unquote(text: str) -> tuple[str, bool]:
    """(the text inside matching quotes, True) when `text` is one quoted YAML scalar, else (text, False)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            inner = yaml.safe_load(text)
        except yaml.YAMLError:
            return text, False
        if isinstance(inner, str):
            return inner, True
    return text, False


def _nested(parts: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def override_layer(override: str, schema: type) -> DictConfig:
    """One `dotted.key=value` override as a config layer, its value read by the key's declared type.

    A key this module cannot type (unknown, untyped such as a bare `dict`, indexed with `[...]`, escaped) and a
    value holding an interpolation go through OmegaConf's own dotlist parser unchanged.
    """
    key, _, text = override.partition("=")
    hint = key_hint(schema, key) if "[" not in key and "\\" not in key else None
    source = f"override '{override}'"
    if hint is None or not _readable(hint) or _is_interpolation(text):
        return OmegaConf.from_dotlist([override])
    if _element_hint(hint) is not None:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config key '{key}' in {source}: cannot parse {text!r}: "
                              f"{str(e).splitlines()[0]}") from None
        if _element_hint(hint)[0] == "list" and not isinstance(value, list):
            raise ConfigError(f"config key '{key}' in {source}: {text!r} is not a list (write [a, b])")
        value = _retype(value, node, hint, key, source) if node is not None else value
    else:
        unquoted, quoted = _unquote(text)
        value = value_from_text(unquoted, hint, key, source, quoted=quoted)
    return OmegaConf.create(_nested(key.split("."), value))


def typed_file_layer(loaded: DictConfig, text: str, schema: type, source: str) -> DictConfig:
    """`loaded` (OmegaConf's reading of the YAML `text`) with every scalar at a typed key re-read from the
    file's text by the key's type (module docstring). Anchors and aliases read as their target; keys merged
    in with `<<` keep OmegaConf's reading."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    if node is None:
        return loaded
    value = OmegaConf.to_container(loaded, resolve=False)
    return OmegaConf.create(_retype(value, node, schema, "", source))
