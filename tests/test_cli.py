"""The `pebr` command: every subcommand answers --help, config errors are one line with exit status 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pebr_mega.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: pebr " + name in capsys.readouterr().out


def test_module_entry_point_and_version():
    out = subprocess.run([sys.executable, "-m", "pebr_mega", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("pebr-mega ")


def test_config_errors_are_one_line_with_status_2(capsys):
    assert main(["train", "--dry-run", "grpo.rollout_batchsize=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "grpo.rollout_batchsize" in err and "rollout_batch_size" in err
    assert main(["sft", "--dry-run", "sft.epochs=two"]) == 2
    assert "sft.epochs" in capsys.readouterr().err


def test_dry_run_prints_resolved_config(capsys):
    assert main(["pipeline", "--dry-run", "pipeline.work_dir=w", "rollout.n=4"]) == 0
    out = capsys.readouterr().out
    assert "work_dir: w" in out and "n: 4" in out


def test_training_commands_fail_at_start_up_with_one_line(tmp_path, capsys):
    assert main(["train", f"run.output_dir={tmp_path}", f"grpo.init_model={tmp_path / 'nope'}"]) == 2
    assert "nope: directory does not exist" in capsys.readouterr().err
    assert main(["sft", f"run.output_dir={tmp_path}", "model.tp=0"]) == 2
    assert "config key 'model.tp' = 0" in capsys.readouterr().err
