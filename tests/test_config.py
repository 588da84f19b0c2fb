"""Config loading: YAML + overrides, unknown keys and wrong types are errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pebr_mega.config import ConfigError, choice, load_config


@dataclass
class _Inner:
    lr: float = 1e-6
    mode: str = choice("token-mean", ["token-mean", "seq-mean-token-sum"])


@dataclass
class _Root:
    inner: _Inner = field(default_factory=_Inner)
    steps: int = 3


def test_yaml_then_overrides_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  lr: 0.5\nsteps: 7\n")
    cfg = load_config(f, ["steps=9", "inner.mode=seq-mean-token-sum"], schema=_Root)
    assert (cfg.inner.lr, cfg.steps, cfg.inner.mode) == (0.5, 9, "seq-mean-token-sum")


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"inner\.lrr.*did you mean 'lr'.*\['lr', 'mode'\]"):
        load_config(None, ["inner.lrr=1"], schema=_Root)
    f = tmp_path / "c.yaml"
    f.write_text("stepz: 1\n")
    with pytest.raises(ConfigError, match=r"stepz.*c\.yaml"):
        load_config(f, schema=_Root)


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"'steps'.*'many'"):
        load_config(None, ["steps=many"], schema=_Root)


def test_choice_violation_lists_choices():
    with pytest.raises(ConfigError, match=r"inner\.mode.*\['token-mean', 'seq-mean-token-sum'\]"):
        load_config(None, ["inner.mode=sum"], schema=_Root)


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", schema=_Root)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["steps"], schema=_Root)


def test_root_config_defaults_load():
    cfg = load_config()
    assert cfg.run.seed == 0
