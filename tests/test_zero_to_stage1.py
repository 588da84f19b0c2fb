"""docs/TRAINING.md, "From zero to stage 1 on one 8xH100 node", checked command by command.

Every command of the section's code blocks is taken from the document itself: each `pebr` command must parse
with the real argument parser, each config, launch script and install extra it names must exist, and each
`launch/torchrun.sh` command must run in its dry-run mode (which resolves the config with the command's
overrides, so a renamed key fails). Downloads and the GPU runs themselves are not executed here.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pebr_mega.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## From zero to stage 1 on one 8xH100 node"


def section_commands() -> list[list[str]]:
    """The section's shell commands (continuation lines joined, comments dropped), as argument lists."""
    text = (ROOT / "docs" / "TRAINING.md").read_text()
    start = text.index(SECTION)
    body = text[start:text.index("\n## ", start + len(SECTION))]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


COMMANDS = section_commands()


def test_the_section_has_the_whole_sequence():
    firsts = [" ".join(c[:2]) for c in COMMANDS]
    for expected in ("pip install", "pebr filter-sft", "pebr merge-sft", "pebr plan", "pebr sft", "pebr split"):
        assert expected in firsts, (expected, firsts)
    subcommands = [c[1] for c in COMMANDS if c[0] == "launch/torchrun.sh"]
    assert subcommands == ["sft", "sample", "train", "train"], subcommands


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "pebr"], ids=lambda c: " ".join(c[:2]))
def test_each_pebr_command_parses_and_its_config_exists(argv):
    if argv[1:] == ["--version"]:
        return  # argparse's version action prints and exits; tests/test_cli.py checks it
    args = build_parser().parse_args(argv[1:])  # SystemExit on a renamed subcommand or flag
    if getattr(args, "config", None):
        assert (ROOT / args.config).is_file(), args.config


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "pip"], ids=lambda c: " ".join(c))
def test_each_install_names_existing_extras(argv):
    from test_packaging import setup_extras

    for spec in argv[2:]:
        match = re.fullmatch(r"-e|\.\[([\w,\-]+)\]|--no-build-isolation", spec)
        assert match, f"unexpected install argument {spec!r}"
        if match.group(1):
            assert set(match.group(1).split(",")) <= set(setup_extras()), spec


@pytest.mark.parametrize("argv", [c for c in COMMANDS if c[0] == "launch/torchrun.sh"],
                         ids=lambda c: " ".join(c[1:2] + c[-1:]))
def test_each_launch_command_resolves_in_dry_run_mode(argv):
    env = {**os.environ, "DRY_RUN": "1", "GPUS": "8", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(ROOT / argv[0]), *argv[1:]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("torchrun --standalone --nnodes 1 --nproc-per-node 8")
