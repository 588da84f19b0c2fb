"""The configuration tree: dataclasses, loaded from YAML plus `key=value` overrides.

Each component owns its config dataclass in its own module (importing only the leaf
`pebr_mega.config_fields`) and is handed only that; this module sits above the components, composes them
into the root `PebrConfig` and validates what the user wrote:

- an unknown key is an error naming the key and the keys that are valid at that level;
- a value is read by its key's declared type from the text as written, in files and overrides alike
  (`pebr_mega.config_values`: a string key keeps `0123`, `12:30`, `yes` as typed); a value that does not fit
  is an error naming the key, the value and the expected type;
- a field declared with ``field(metadata={"choices": [...]})`` must take one of those values;
- a file must hold a mapping of sections, a section or dict field a mapping, a list field a list;
- an interpolation (`${other.key}`) must resolve;
- every other rule on values (ranges, cross-field rules) is the section's `__post_init__`
  (`config_fields.check_fields`), which raises a `ConfigError` naming the dotted key.

Stage sections and shared sections: see `pebr_mega.stage_config` for the one precedence rule (a stage
section's key wins over the `actor.*` key of the same name, for that stage only).
"""
# No `from __future__ import annotations`: OmegaConf resolves the root schema's field types at run time.

import dataclasses
import warnings
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, InterpolationResolutionError, OmegaConfBaseException,
                              ValidationError)

from pebr_mega.actor.config import ActorConfig
from pebr_mega.algo.grpo import AlgoConfig
from pebr_mega.config_easyr1 import is_easyr1_key, is_easyr1_tree, renamed_key, translate_tree
from pebr_mega.config_fields import ConfigError, ConfigWarning, choice
from pebr_mega.config_values import _nested, override_layer, typed_file_layer
from pebr_mega.data.images import ImageConfig
from pebr_mega.data.records import DataConfig
from pebr_mega.logging import LoggingConfig
from pebr_mega.models.config import ModelConfig
from pebr_mega.rewards.model import RewardConfig
from pebr_mega.rollout.engine import RolloutConfig
from pebr_mega.stage_config import GRPOTrainerConfig, PipelineConfig, SampleConfig, SFTConfig, StageLoopConfig

__all__ = ["ConfigError", "EvalSource", "PebrConfig", "RunConfig", "choice", "eval_source", "load_config",
           "pipeline_eval_files", "to_dict", "to_yaml"]


@dataclass
class RunConfig:
    """Where a run writes and how it is seeded."""

    output_dir: str = "runs/default"
    seed: int = 0
    peak_tflops: float = 0.0  # the card's dense peak for MFU; 0 = known cards (H100/H200/A100) only


@dataclass
class PebrConfig:
    """The root of the tree; every section is one component's own config."""

    run: RunConfig = field(default_factory=RunConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    grpo: GRPOTrainerConfig = field(default_factory=GRPOTrainerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


@dataclass(frozen=True)
class EvalSource:
    """The held-out file a stage evaluates on, and the config key that named it (for messages)."""

    key: str  # "grpo.eval_file", "sft.eval_file" or "data.eval_file"
    path: str  # "" when the stage has no eval file


def eval_source(cfg: PebrConfig, loop: StageLoopConfig) -> EvalSource:
    """The eval file of the stage `loop` (`cfg.grpo`, `cfg.sft`, or a pipeline stage's copy): its own
    `<section>.eval_file`, else the shared `data.eval_file`. The one place that fallback is decided; a held-out
    slice of the training file (`grpo.eval_holdout`) is the trainer's other source and excludes this one."""
    if loop.eval_file:
        return EvalSource(f"{loop.section}.eval_file", loop.eval_file)
    return EvalSource("data.eval_file", cfg.data.eval_file or "")


def pipeline_eval_files(cfg: PebrConfig) -> dict[str, str | None]:
    """The eval-file keys `pebr pipeline` sets in its stages' configs, by key: `pipeline.eval_file`, the recipe's
    held-out set, where set, else the key's own value. The SFT stage takes it as `data.eval_file` (its own
    `sft.eval_file` still wins, `eval_source`), the GRPO stages as `grpo.eval_file`. Decided here, beside
    `eval_source`, so no stage re-derives it; the stages' recorded fingerprints hold these keys as they are."""
    own = cfg.pipeline.eval_file
    return {"data.eval_file": own or cfg.data.eval_file, "grpo.eval_file": own or cfg.grpo.eval_file}


def _valid_keys(schema: Any, dotted: str) -> list[str]:
    node = schema
    for part in [p for p in dotted.split(".")[:-1] if p]:
        node = getattr(node, part, None)
        if node is None:
            return []
    if dataclasses.is_dataclass(node):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _check_choices(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r} is not one of {list(choices)}")
        if dataclasses.is_dataclass(value):
            _check_choices(value, key + ".")


# Keys that existed once and were removed on purpose: the error says what replaced them.
REMOVED_KEYS = {
    "rewards.stage": "grpo.stage alone selects the reward preset (stage1 | stage2); remove rewards.stage",
}


def _raise_readable(err: OmegaConfBaseException, schema_obj: Any, source: str) -> None:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) and key in REMOVED_KEYS:
        raise ConfigError(f"config key '{key}' in {source} was removed: {REMOVED_KEYS[key]}") from None
    if isinstance(err, ConfigKeyError):
        valid = _valid_keys(schema_obj, key)
        near = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ConfigError(f"unknown config key '{key}' in {source}{hint}; valid keys here: {valid}") from None
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        raise ConfigError(f"config key '{key}' in {source}: {first}") from None
    raise ConfigError(f"config error at '{key}' in {source}: {str(err).splitlines()[0]}") from None


def _shape(value: Any) -> str | None:
    """'mapping' or 'list' for containers (dataclass, dict / list) and their OmegaConf nodes, else None."""
    if dataclasses.is_dataclass(value) or isinstance(value, (dict, DictConfig)):
        return "mapping"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    return None


def _check_shapes(layer: Any, schema_obj: Any, source: str, prefix: str = "") -> None:
    """A list where the schema has a mapping (or the reverse) is an error naming the key (OmegaConf's merge
    only says 'Cannot merge incompatible container types')."""
    if not isinstance(layer, DictConfig) or not dataclasses.is_dataclass(schema_obj):
        return
    for key in layer.keys():
        if not hasattr(schema_obj, str(key)):
            continue  # unknown keys are reported by the merge, with the valid ones
        expected, value = getattr(schema_obj, str(key)), layer._get_node(key)
        want, got = _shape(expected), _shape(value)
        dotted = f"{prefix}{key}"
        if want is not None and got is not None and want != got:
            raise ConfigError(f"config key '{dotted}' in {source} must be a {want}, got a {got}")
        scalar = value._value()
        if want == "mapping" and got is None and scalar is not None and not OmegaConf.is_interpolation(layer, key):
            raise ConfigError(f"config key '{dotted}' in {source} must be a mapping, got {scalar!r}")
        if got == "mapping":
            _check_shapes(value, expected, source, dotted + ".")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type | None = None) -> PebrConfig:
    """Load `schema` (default: the root `PebrConfig`) from an optional YAML file, then apply overrides.

    Overrides are `dotted.key=value` strings, applied in order after the file. Every scalar, in the file or
    an override, is read from its text by its key's declared type (`pebr_mega.config_values`).
    """
    schema = schema or PebrConfig
    base = OmegaConf.structured(schema)
    layers: list[tuple[Any, str]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # yaml errors come in several classes
            raise ConfigError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {p} must hold a mapping of sections (run:, rollout:, ...), "
                              f"not a {'list' if isinstance(loaded, ListConfig) else type(loaded).__name__}")
        tree = OmegaConf.to_container(loaded)
        if schema is PebrConfig and is_easyr1_tree(tree):
            layers += _easyr1_layers(tree, str(p))
        else:
            # YAML 1.1 guessed each scalar's type; re-read the file's text by the keys' declared types instead.
            layers.append((typed_file_layer(loaded, p.read_text(encoding="utf-8"), schema, str(p)), str(p)))
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override '{ov}' is not of the form key=value")
        key, _, text = ov.partition("=")
        if schema is PebrConfig and is_easyr1_key(key):
            renamed = renamed_key(key)
            if renamed is not None:  # the same meaning under another name: read by the pebr key's type, as typed
                layers.append((override_layer(f"{renamed}={text}", schema), f"override '{ov}' ({renamed}, from EasyR1)"))
            else:
                layers += _easyr1_layers(_nested(key.split("."), yaml.safe_load(text) if text else None),
                                         f"override '{ov}'")
            continue
        layers.append((override_layer(ov, schema), f"override '{ov}'"))
    merged = base
    schema_obj = schema()
    for layer, source in layers:
        _check_shapes(layer, schema_obj, source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            _raise_readable(e, schema_obj, source)
    try:
        cfg = OmegaConf.to_object(merged)
    except InterpolationResolutionError as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"config key '{key}': cannot resolve {str(e).splitlines()[0]}") from None
    _check_choices(cfg)
    if isinstance(cfg, PebrConfig):
        # The stage's upstream sizes, decided here once: no component fills them again.
        cfg.grpo = cfg.grpo.with_stage_defaults()
    return cfg


def _easyr1_layers(tree: dict, source: str) -> list[tuple[Any, str]]:
    """EasyR1 settings (a config file's tree, or one override) as pebr layers; each dropped key is one
    `ConfigWarning` line (`pebr_mega/config_easyr1.py` has the table)."""
    settings, notes = translate_tree(tree)
    for note in notes:
        warnings.warn(f"{source}: {note}", ConfigWarning, stacklevel=3)
    return [(OmegaConf.create(_nested(key.split("."), value)), f"{source} ({key}, from EasyR1)")
            for key, value in settings.items()]


def to_dict(cfg: PebrConfig) -> dict:
    """The config as plain dicts and lists (for printing, saving next to a run, or wandb)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: PebrConfig) -> str:
    """The config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_value(cfg: PebrConfig, key: str) -> Any:
    """The value at dotted `key` of a loaded config (`pebr config --get`); an unknown key names the valid ones."""
    node: Any = cfg
    for part in key.split("."):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            raise ConfigError(f"unknown config key '{key}'" + (f"; valid here: {', '.join(names)}" if names else ""))
        node = getattr(node, part)
    return node
