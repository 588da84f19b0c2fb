"""Launch scripts parse, and their dry-run mode prints the resolved command and config without running."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "launch").glob("*.sbatch")) + sorted((ROOT / "launch").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


def _dry(script: str, *args: str, **env: str) -> str:
    e = {**os.environ, "DRY_RUN": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    out = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=e, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_stage2_sbatch_dry_run_resolves_stage_and_overrides():
    out = _dry("pebr_stage2.sbatch", "actor.lr=2e-6", WORK="ckpt/w", SLURM_CPUS_ON_NODE="64")
    first = out.splitlines()[0]
    assert first.startswith("srun ") and "torchrun --nnodes 1 --nproc-per-node 8" in first
    # the one task per node gets the node's CPUs for its 8 ranks (srun's default is one CPU per task)
    assert first.startswith("srun --ntasks-per-node 1 --cpus-per-task 64 ")
    assert "-m pebr_mega train --config launch/configs/qwen2_5_vl_7b.yaml grpo.stage=stage2" in first
    assert "stage: stage2" in out and "init_model: ckpt/w/stage1/hf" in out and "lr: 2.0e-06" in out


def test_torchrun_dry_run_and_config_errors_surface():
    out = _dry("torchrun.sh", "sft", "--config", "launch/configs/qwen2_5_vl_3b.yaml", GPUS="2")
    assert out.splitlines()[0].startswith("torchrun --standalone --nnodes 1 --nproc-per-node 2")
    assert "tp: 2" in out and "lr: 1.0e-05" in out
    e = {**os.environ, "DRY_RUN": "1", "GPUS": "1"}
    bad = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "train", "--config",
                          "launch/configs/qwen2_5_vl_7b.yaml", "grpo.stages=1"], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "grpo.stages" in bad.stderr


def test_shipped_configs_load_with_upstream_values():
    from pebr_mega.config import load_config
    from pebr_mega.recipe.demo import demo_config_path

    cfg = load_config(ROOT / "launch/configs/qwen2_5_vl_7b.yaml", ["grpo.stage=stage2"])
    g = cfg.grpo
    assert (g.rollout_batch_size, g.mini_batch_size, g.epochs) == (512, 128, 2)
    assert (cfg.actor.lr, cfg.algo.kl_coef, cfg.algo.clip_high, cfg.rollout.n, cfg.rollout.temperature) == (1e-6, 0.01, 0.3, 8, 1.2)
    assert load_config(demo_config_path()).model.spec == "torch"


# Upstream's values (cythu/PeBR-R1 examples/pebr_sample.yaml, pebr_stage1.yaml, pebr_stage2.yaml), restated.
UPSTREAM = {
    "sample": {"n": 8, "temperature": 1.2, "top_p": 0.99, "max_pixels": 4194304},
    "images": {"min_pixels": 576, "max_pixels": 802816},
    "rollout": {"n": 8, "temperature": 1.2, "top_p": 0.99, "max_new_tokens": 2048, "val_temperature": 0.5, "val_n": 1},
    "data": {"max_prompt_length": 2048, "filter_overlong_prompts": True},
    "rewards": {"answer_grading": "upstream", "clip_image_size": 336, "clip_max_text_tokens": 248, "clip_threshold": 0.4},
}


@pytest.mark.parametrize("name", ["qwen2_5_vl_3b.yaml", "qwen2_5_vl_7b.yaml"])
def test_shipped_configs_carry_upstream_sampling_values_and_need_no_eval_file(name):
    from pebr_mega.config import load_config

    cfg = load_config(ROOT / "launch/configs" / name)
    for section, values in UPSTREAM.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert not cfg.data.eval_file and not cfg.pipeline.eval_file and not cfg.grpo.eval_file
    assert cfg.data.format_prompt is None  # the packaged template


@pytest.mark.parametrize("script", ["pebr_sft.sbatch", "pebr_sample.sbatch", "pebr_stage1.sbatch",
                                    "pebr_stage2.sbatch"])
def test_sbatch_writes_under_the_configs_own_work_dir(script):
    """A 3B config sent through the 7B default scripts writes under its own pipeline.work_dir (checkpoints/pebr_3b),
    never into the 7B run's directories; WORK still overrides it."""
    out = _dry(script, CONFIG="launch/configs/qwen2_5_vl_3b.yaml")
    first = out.splitlines()[0]
    assert "pebr_7b" not in first and "checkpoints/pebr_3b/" in first, first
    assert "pebr_7b" not in out.split("\n", 1)[1].split("pipeline:")[0].replace("Qwen2.5-VL-7B", "")
    assert "ckpt/w/" in _dry(script, CONFIG="launch/configs/qwen2_5_vl_3b.yaml", WORK="ckpt/w").splitlines()[0]


def test_every_config_a_launch_header_names_exists():
    """Each `--config F` and `CONFIG=F` in the launch scripts' and docs' example lines is a shipped file."""
    import re

    texts = [p.read_text() for p in SCRIPTS] + [(ROOT / "README.md").read_text(), (ROOT / "docs/TRAINING.md").read_text()]
    named = {m for t in texts for m in re.findall(r"(?:--config |CONFIG=)(launch/configs/[\w.\-]+\.yaml)", t)}
    assert named, "no example names a config"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, missing
