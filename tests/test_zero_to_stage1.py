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


# ------------------------------------------------------------------------------------------------ rehearsal
# What makes the 7B node's commands run on 2 CPU processes with the tiny model, appended to every command that
# takes config overrides: fp32 and SDPA on CPU, one TP rank, the tiny processor's pixel bounds, short answers,
# batches of 2, one step per GRPO stage, the HF engine and PIL.
CPU_OVERRIDES = ["model.params_dtype=float32", "model.spec=torch", "model.tp=1", "images.min_pixels=3136",
                 "images.max_pixels=50176", "sample.max_pixels=50176", "images.backend=pil", "rollout.engine=hf",
                 "data.max_prompt_length=1024", "rollout.max_new_tokens=8", "sft.batch_size=2", "sft.epochs=1",
                 "sft.cutoff_len=1024", "sample.batch_size=16", "grpo.rollout_batch_size=2", "grpo.mini_batch_size=2",
                 "grpo.max_steps=1", "rollout.batch_size=16", "logging.progress_bar=false"]
# A random tiny model answers nothing right, so the split is told that every answer counts as correct (all
# questions easy), and stage 2 trains on the easy split too (its own grpo.train_file overridden, that stage only).
SPLIT_OVERRIDES = ["--correct-threshold", "0"]


def _run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


def _lay_out_the_node(work: Path, env: dict) -> None:
    """The tiny model and CLIP where the configs expect Qwen2.5-VL-7B and FG-CLIP, and synthetic data laid out
    as the section's table says the real downloads go."""
    import json
    import shutil

    py = [sys.executable, "-m", "pebr_mega"]
    (work / "launch").symlink_to(ROOT / "launch")
    _run(py + ["tiny-model", "--out", "models/Qwen2.5-VL-7B-Instruct"], work, env)
    _run(py + ["make-tiny-clip", "--out", "models/FG-CLIP-large"], work, env)
    _run(py + ["synth", "--out", "synth", "--num", "8", "--num-eval", "4", "--seed", "0"], work, env)
    synth = work / "synth"
    sft = json.loads((synth / "sft.json").read_text())
    for folder, json_path, rows in (("dataset/mulberry_images", "dataset/mulberry_sft.json", sft[:4]),
                                    ("dataset/pebr_r1_sft", "dataset/pebr_r1_sft/pebr_sft.json", sft[4:])):
        shutil.copytree(synth / "images", work / folder / "images", dirs_exist_ok=True)
        (work / json_path).write_text(json.dumps(rows))
    shutil.copytree(synth / "images", work / "dataset/grpo/pebr_grpo_images/images")
    shutil.copy(synth / "grpo.json", work / "dataset/grpo/pebr_grpo_dataset.json")


def test_the_section_rehearsed_on_cpu_through_torchrun(tmp_path):
    """Every command of the section, in order, in a folder laid out as the section says, with the launch
    scripts at GPUS=2 (torchrun on gloo) and `CPU_OVERRIDES` appended: SFT, sampling, split, stage 1 (CLIP
    reward from the tiny CLIP), stage 2, each leaving its model. Downloads and pip are the only lines skipped."""
    import os

    work = tmp_path / "node"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUS": "2", "MASTER_PORT": "29561", "CUDA_VISIBLE_DEVICES": "",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    _lay_out_the_node(work, env)
    ran = []
    for argv in COMMANDS:
        if argv[0] in ("pip", "huggingface-cli"):
            continue
        if argv[0] == "pebr":
            # The node's 8 GPUs are the rehearsal's 2 processes (GPUS=2 for the launch script below).
            args = ["2" if prev == "--world-size" else a for prev, a in zip([""] + argv[1:], argv[1:])]
            cmd = [sys.executable, "-m", "pebr_mega", *args]
            takes_overrides = argv[1] in ("sft", "sample", "train", "plan", "pipeline")
        else:
            cmd = ["bash", str(ROOT / argv[0]), *argv[1:]]
            takes_overrides = True
        if argv[:2] == ["pebr", "split"]:
            cmd += SPLIT_OVERRIDES
        if takes_overrides and argv[1] != "plan":
            cmd += CPU_OVERRIDES
            if "grpo.stage=stage2" in argv:
                cmd.append("grpo.train_file=checkpoints/pebr_7b/split/easycase.json")
        ran.append(" ".join(argv[:2]))
        _run(cmd, work, env)
    assert ran.count("launch/torchrun.sh train") == 2 and "pebr merge-sft" in ran
    ckpt = work / "checkpoints" / "pebr_7b"
    for stage in ("sft", "stage1", "stage2"):
        assert (ckpt / stage / "hf" / "config.json").is_file(), stage
    assert (ckpt / "sample" / "rollouts.jsonl").is_file() and (ckpt / "split" / "easycase.json").is_file()
