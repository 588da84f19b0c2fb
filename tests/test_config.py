"""Config loading: YAML + overrides, unknown keys and wrong types are errors that name the key."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pebr_mega.config import ConfigError, choice, load_config, to_yaml


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


# ------------------------------------------------------------------------ values checked at load (issue 12)
@pytest.mark.parametrize("override,key", [
    ("rollout.n=0", "rollout.n"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("rollout.temperature=-1", "rollout.temperature"),
    ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens"),
    ("rollout.batch_size=0", "rollout.batch_size"),
    ("rollout.top_k=0", "rollout.top_k"),
    ("grpo.rollout_batch_size=0", "grpo.rollout_batch_size"),
    ("grpo.mini_batch_size=-4", "grpo.mini_batch_size"),
    ("grpo.ppo_epochs=0", "grpo.ppo_epochs"),
    ("grpo.keep_last=0", "grpo.keep_last"),
    ("grpo.max_steps=0", "grpo.max_steps"),
    ("grpo.save_every=-1", "grpo.save_every"),
    ("sft.batch_size=0", "sft.batch_size"),
    ("sft.keep_last=0", "sft.keep_last"),
    ("sft.epochs=0", "sft.epochs"),
    ("sample.n=0", "sample.n"),
    ("sample.top_p=0", "sample.top_p"),
    ("sample.temperature=-0.5", "sample.temperature"),
    ("sample.batch_size=0", "sample.batch_size"),
    ("data.max_prompt_length=0", "data.max_prompt_length"),
    ("logging.console_every=0", "logging.console_every"),
    ("model.tp=0", "model.tp"),
    ("rewards.timeout_s=0", "rewards.timeout_s"),
    ("rewards.num_workers=0", "rewards.num_workers"),
    ("algo.clip_low=1.5", "algo.clip_low"),
])
def test_out_of_range_values_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"config key '{key}' = " in str(e.value) and "\n" not in str(e.value)


def test_one_sample_per_prompt_warns_and_algo_n_is_gone():
    from pebr_mega.config_fields import ConfigWarning

    with pytest.warns(ConfigWarning, match=r"rollout\.n' = 1.*baseline"):
        cfg = load_config(None, ["rollout.n=1"])
    assert cfg.rollout.n == 1
    with pytest.raises(ConfigError, match=r"unknown config key 'algo.n'"):
        load_config(None, ["algo.n=8"])


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", "must hold a mapping of sections"),
    ("rewards:\n  weights: [1, 2]\n", "'rewards.weights' in .* must be a mapping, got a list"),
    ("rollout: [1, 2]\n", "'rollout' in .* must be a mapping, got a list"),
    ("rollout: 3\n", "'rollout' in .* must be a mapping, got 3"),
    ("pipeline:\n  stages: {a: 1}\n", "'pipeline.stages' in .* must be a list, got a mapping"),
    ("run:\n  output_dir: ${oops.x}\n", "'run.output_dir': cannot resolve .*oops.x"),
])
def test_malformed_files_are_one_line_errors_naming_the_key(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(f)
    assert "\n" not in str(e.value)


def test_interpolations_that_resolve_still_work(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pipeline:\n  work_dir: w\nrun:\n  output_dir: ${pipeline.work_dir}/x\n")
    assert load_config(f).run.output_dir == "w/x"


# ------------------------------------------------------------------------ values read by the key's type (issue 23)
# YAML 1.1 read these as 83, 202401, 750, True and 1000.0; a string key keeps the text as typed.
STRING_TEXTS = ["0123", "2024_01", "12:30", "yes", "1e3", "off", "null", "[a, b]", "a: b", " 7 ", ""]


@pytest.mark.parametrize("text", STRING_TEXTS)
def test_a_string_key_keeps_the_override_text_as_typed(text):
    assert load_config(None, [f"run.output_dir={text}"]).run.output_dir == text


@pytest.mark.parametrize("text", ["0123", "2024_01", "12:30", "yes", "1e3"])
def test_a_string_key_keeps_the_yaml_file_text_as_written(tmp_path, text):
    f = tmp_path / "c.yaml"
    f.write_text(f"run:\n  output_dir: {text}\nlogging:\n  extra_console_keys: [{text}, x]\n")
    cfg = load_config(f)
    assert cfg.run.output_dir == text and cfg.logging.extra_console_keys == [text, "x"]


def test_quotes_interpolations_and_null_keep_their_meaning(tmp_path):
    cfg = load_config(None, ["actor.distributed_optimizer='off'", "run.output_dir=\"a b\"", "data.image_root=null",
                             "grpo.epochs=~", "sample.output=${run.output_dir}/0123", "data.eval_file="])
    assert cfg.actor.distributed_optimizer == "off" and cfg.run.output_dir == "a b"
    assert cfg.data.image_root is None and cfg.data.eval_file is None
    assert cfg.grpo.epochs == 1  # null: the stage's own value, filled at load (stage 1: one epoch)
    assert cfg.sample.output == "a b/0123"
    assert load_config(None, ["data.image_root='null'"]).data.image_root == "null"  # quoted: the text
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  image_root: ~\n  eval_file: '0123'\nrun:\n  output_dir: \"x\\ty\"\n")
    cfg = load_config(f)
    assert (cfg.data.image_root, cfg.data.eval_file, cfg.run.output_dir) == (None, "0123", "x\ty")


@pytest.mark.parametrize("override, value", [
    ("run.seed=0123", 123), ("run.seed=-5", -5), ("run.seed=1_000", 1000),
    ("actor.lr=1e-6", 1e-6), ("actor.lr=3", 3.0), ("actor.lr=.5", 0.5), ("run.peak_tflops=inf", float("inf")),
    ("logging.progress_bar=yes", True), ("logging.progress_bar=Off", False), ("logging.progress_bar=0", False),
    ("pipeline.stages=[sft, 0123]", ["sft", "0123"]), ("rewards.weights={format: 1, accuracy: 1e-1}",
                                                       {"format": 1.0, "accuracy": 0.1}),
])
def test_typed_keys_read_the_text_by_their_type(override, value):
    key = override.partition("=")[0]
    got = load_config(None, [override])
    for part in key.split("."):
        got = getattr(got, part)
    assert got == value


@pytest.mark.parametrize("override, expected", [
    ("run.seed=12:30", "an integer"), ("run.seed=1e3", "an integer"), ("run.seed=1.5", "an integer"),
    ("run.seed=0x10", "an integer"), ("run.seed=yes", "an integer"), ("actor.lr=12:30", "a number"),
    ("actor.lr=fast", "a number"), ("logging.progress_bar=2", "a boolean"), ("logging.progress_bar=maybe", "a boolean"),
    ("rewards.weights.format=high", "a number"), ("rewards.weights={format: x}", "a number"),
    ("pipeline.stages=sft", "a list"), ("grpo.rollout_batch_size=4.0", "an integer"),
])
def test_a_value_that_does_not_fit_names_key_value_and_type(override, expected):
    key, _, text = override.partition("=")
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    message = str(e.value)
    assert f"'{key}" in message and repr(text.split(": ")[-1].rstrip("}")) in message and expected in message
    assert "\n" not in message


def test_a_yaml_value_that_does_not_fit_names_key_file_and_type(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seed: 12:30\n")  # YAML 1.1 would have read 750
    with pytest.raises(ConfigError, match=r"'run\.seed' in .*c\.yaml: '12:30' is not an integer"):
        load_config(f)


def test_untyped_mappings_keep_omegaconfs_reading():
    cfg = load_config(None, ["rollout.sglang_args={mem_fraction_static: 0.8}", "rollout.sglang_args.chunked=512"])
    assert cfg.rollout.sglang_args == {"mem_fraction_static": 0.8, "chunked": 512}


def test_the_stage_sizes_are_filled_at_load_and_refilled_for_another_stage():
    cfg = load_config(None, ["grpo.mini_batch_size=64"])
    g = cfg.grpo
    assert (g.stage, g.rollout_batch_size, g.mini_batch_size, g.epochs) == ("stage1", 560, 64, 1)
    s2 = g.for_stage("stage2")  # the pipeline runs the loaded config as stage 2: the user's 64 stays
    assert (s2.stage, s2.rollout_batch_size, s2.mini_batch_size, s2.epochs) == ("stage2", 512, 64, 2)
    assert s2.for_stage("stage1") == g
    assert "rollout_batch_size: 560" in to_yaml(cfg)  # what the run uses is what it records


def test_a_stage_evaluates_on_its_own_eval_file_else_the_shared_one():
    from pebr_mega.config import EvalSource, eval_source

    cfg = load_config(None, ["data.eval_file=shared.json", "sft.eval_file=own.json"])
    assert eval_source(cfg, cfg.sft) == EvalSource("sft.eval_file", "own.json")
    assert eval_source(cfg, cfg.grpo) == EvalSource("data.eval_file", "shared.json")
    default = load_config(None, [])
    assert eval_source(default, default.grpo).path == ""


def test_a_stage_size_assigned_after_loading_is_kept_for_another_stage():
    cfg = load_config(None, [])
    cfg.grpo.rollout_batch_size = 2  # as a script does between loading and running the pipeline
    s2 = cfg.grpo.for_stage("stage2")
    assert (s2.rollout_batch_size, s2.mini_batch_size, s2.epochs) == (2, 128, 2)
