"""Every input path a command will open, checked at start-up before any model or engine is built.

The real run and `--dry-run` both call `check_inputs` (through the CLI's one start-up check), so a misspelt
`rewards.clip_model_dir` or a split file not written yet stops both with one line naming the key, instead of
the real run failing after the engine, the actor and the reference model were built. Only existence and
readability are checked here: what is inside a data file or an image is the data layer's business (the dry
run reads the records and image headers; the run counts its skips).

A path that an earlier stage of the same `pebr pipeline` writes (the SFT model, the split files) is not an
input of that pipeline: only the pipeline's own inputs (`pipeline.*`, the CLIP checkpoint) are checked there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pebr_mega.config import eval_source
from pebr_mega.plan.checks import CheckResult
from pebr_mega.rewards.model import preset_weights


@dataclass(frozen=True)
class Input:
    """One path a command opens: its config key, the value, what it must be, and where it comes from."""

    key: str
    path: str
    kind: str  # "file" | "dir" (a model: an HF directory or a Megatron checkpoint)
    origin: str = ""  # how to make it when it is missing (an earlier command), shown in the error


def _grpo_inputs(cfg: Any, stage: str) -> list[Input]:
    g = cfg.grpo
    split = "easycase.json" if stage == "stage1" else "mediumcase.json"
    out = [Input("grpo.init_model", g.init_model, "dir",
                 "the SFT model's hf/ export for stage 1, the stage-1 model's for stage 2"),
           Input("grpo.train_file", g.train_file, "file",
                 f"`pebr split` writes {split}: run `pebr sample` and `pebr split` first")]
    source = eval_source(cfg, g)
    if source.path:
        out.append(Input(source.key, source.path, "file"))
    return out


def _clip_input(cfg: Any, stage: str) -> list[Input]:
    if not preset_weights(cfg.rewards, stage).get("clip"):
        return []
    return [Input("rewards.clip_model_dir", cfg.rewards.clip_model_dir or "", "dir",
                  "point it at a local FG-CLIP or other CLIP-family checkpoint: docs/TRAINING.md, \"From zero to stage 1\"")]


def command_inputs(cfg: Any, command: str) -> list[Input]:
    """The paths `command` opens from its config, in the order it opens them."""
    image_root = [Input("data.image_root", cfg.data.image_root, "dir")] if cfg.data.image_root else []
    if command == "train":
        return _grpo_inputs(cfg, cfg.grpo.stage) + image_root + _clip_input(cfg, cfg.grpo.stage)
    if command == "sft":
        sft = cfg.sft
        data = ([Input("sft.dataset_info", sft.dataset_info, "file")] if sft.dataset_info else []) + (
            [Input("sft.train_file", sft.train_file, "file", "`pebr merge-sft` writes it (docs/TRAINING.md)")]
            if sft.train_file or not sft.dataset_info else [])
        root = [Input("sft.image_root", sft.image_root, "dir")] if sft.image_root else []
        source = eval_source(cfg, sft)
        evals = [Input(source.key, source.path, "file")] if source.path else []
        return [Input("sft.init_model", sft.init_model, "dir")] + data + root + evals
    if command == "sample":
        sc = cfg.sample
        return [Input("sample.model", sc.model, "dir", "the SFT model's hf/ export (`pebr sft`)"),
                Input("sample.dataset", sc.dataset, "file")] + image_root
    if command == "pipeline":
        p = cfg.pipeline
        out = [Input("pipeline.base_model", p.base_model, "dir")]
        if "sft" in p.stages:
            out.append(Input("pipeline.sft_file", p.sft_file, "file", "`pebr merge-sft` writes it"))
        if any(s in p.stages for s in ("sample", "split", "stage1", "stage2")):
            out.append(Input("pipeline.grpo_file", p.grpo_file, "file"))
        if p.image_root:
            out.append(Input("pipeline.image_root", p.image_root, "dir"))
        if p.eval_file:
            out.append(Input("pipeline.eval_file", p.eval_file, "file"))
        for stage in ("stage1", "stage2"):
            if stage in p.stages:
                out += [i for i in _clip_input(cfg, stage) if i not in out]
        return out
    raise ValueError(f"unknown command {command!r}")


def _problem(item: Input) -> str | None:
    """Why `item` cannot be opened, or None."""
    if not item.path:
        return "is not set"
    path = Path(item.path)
    if not path.exists():
        what = "directory" if item.kind == "dir" else "file"
        return f"{what} does not exist" + (f" ({item.origin})" if item.origin else "")
    if item.kind == "file" and not path.is_file():
        return "is not a file"
    if item.kind == "dir" and not path.is_dir():
        return "is not a directory"
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        return "is not readable by this user"
    return None


def check_inputs(cfg: Any, command: str) -> CheckResult:
    """One error line per input path of `command` that is unset, missing, of the wrong kind or unreadable."""
    r = CheckResult()
    for item in command_inputs(cfg, command):
        why = _problem(item)
        if why:
            r.errors.append(f"{item.key}={item.path!r} {why}")
    return r
