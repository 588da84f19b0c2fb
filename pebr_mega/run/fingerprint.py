"""Fingerprints: the settings that define what a stage trains or produces, recorded beside its outputs.

A rerun into the same output directory compares its settings with the recorded ones before anything is
loaded, so a result made with other settings is never resumed or reused silently:

- `pebr train` / `pebr sft`: `run.output_dir/fingerprint.json`, written at start-up; a mismatch stops with
  one line naming the differing keys (`old -> new`); `--force-restart` discards the old run's state.
- `pebr pipeline`: each stage's `STARTED` and `DONE` files carry the stage's fingerprint, which includes the
  digest of the stage before it, so a changed stage invalidates every stage after it
  (`pebr_mega.recipe.pipeline`).

What is recorded (`stage_settings`): every key of the sections a stage reads, except the `OPERATIONAL` ones,
which change where results go, how often they are saved or reported, how the work is laid out over the
devices, or which backend computes the same numbers; none of them changes what is trained. Paths are
recorded resolved; the data files in `CONTENT_KEYS` also by the SHA-256 of their bytes (`<key>#sha256`), so
an edited file with the same name is noticed. Model directories are recorded by path only (their weights
are gigabytes; a pipeline's own models are covered by the stage chain). A key that only one side records
(added or removed by an upgrade of pebr) is not a difference.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from pebr_mega import outputs
from pebr_mega.actor.config import ActorConfig
from pebr_mega.config import PebrConfig, eval_source, to_dict
from pebr_mega.stage_config import SFTConfig

FINGERPRINT = "fingerprint.json"
FORMAT = "pebr-fingerprint/1"

# Keys that do not change what a stage trains or produces (see the module docstring). `logging.*`,
# `pipeline.work_dir` and `pipeline.stages` are never read: no stage records those sections whole.
OPERATIONAL = frozenset({
    "run.output_dir", "run.peak_tflops",
    # how often the loop saves and evaluates, and how many checkpoints it keeps
    "grpo.save_every", "grpo.keep_last", "grpo.eval_every", "sft.save_every", "sft.keep_last", "sft.eval_every",
    "grpo.eval_before", "sft.eval_before",
    # layout over devices and memory savings (a checkpoint resumes at another TP/PP)
    "model.tp", "model.pp", "model.sequence_parallel", "model.recompute_granularity", "model.recompute_method",
    "model.recompute_num_layers", "model.vision_recompute", "actor.micro_batch_tokens",
    "actor.distributed_optimizer", "rollout.sglang_tp_size", "rollout.weight_bucket_mb", "rollout.sglang_args",
    # backends that compute the same numbers
    "model.spec", "model.attention", "actor.kernels", "actor.logprobs_from", "rollout.engine", "images.backend",
    "images.dali_batch_size", "images.dali_threads",
    # the reward guard's resources, and the CLIP scorer's placement
    "rewards.timeout_s", "rewards.num_workers", "rewards.worker_memory_mb", "rewards.clip_device",
    "rewards.clip_batch_size",
    # where sampling writes
    "sample.output",
})

# Data files recorded by content as well as by path.
CONTENT_KEYS = ("grpo.train_file", "grpo.eval_file", "sft.train_file", "sft.dataset_info", "sft.eval_file",
                "data.eval_file", "data.format_prompt", "sample.dataset", "pipeline.sft_file", "pipeline.grpo_file",
                "pipeline.eval_file")
# Keys holding paths (recorded resolved, so that a relative path from another folder compares equal).
PATH_KEYS = frozenset(CONTENT_KEYS) | {"grpo.init_model", "sft.init_model", "sample.model", "data.image_root",
                                       "rewards.clip_model_dir", "pipeline.base_model", "pipeline.image_root"}

# The sections each kind of stage reads whole, and the single keys it reads from other sections.
_SECTIONS = {
    "grpo": ("run", "rollout", "images", "data", "rewards", "algo", "model", "actor", "grpo"),
    "sft": ("run", "images", "data", "model", "actor", "sft"),
    "sample": ("run", "images", "data", "sample"),
    "split": (),
    "export": (),
}
_KEYS = {
    "sample": ("rollout.max_new_tokens", "rollout.batch_size", "rewards.answer_grading"),
    "split": ("sample.n", "sample.correct_threshold", "pipeline.grpo_file"),
}
# What the SFT stage's held-out evaluation reads, recorded only when it has an evaluation set.
_SFT_EVAL = ("rollout.val_temperature", "rollout.val_n", "rollout.top_p", "rollout.top_k", "rollout.max_new_tokens",
             "rollout.batch_size")
# Keys a stage reads but that another key replaces: sampling's own pixel cap, SFT's own actor keys.
_SHADOWED = {
    "sample": ("images.max_pixels", "data.eval_file"),
    "sft": tuple(f"actor.{k}" for k in sorted({f.name for f in dataclasses.fields(ActorConfig)}
                                                & {f.name for f in dataclasses.fields(SFTConfig)})),
}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and prefix == "":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes; read once per process while the file's size and mtime stay the same (a
    pipeline's start-up fingerprints the same data files for several stages)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_of(p, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    return outputs.file_sha256(path)


def stage_settings(cfg: PebrConfig, kind: str, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The settings that define a `kind` stage's result (`grpo`, `sft`, `sample`, `split`, `export`) under `cfg`,
    as a flat `{dotted key: value}` mapping (JSON values); `exclude` drops keys a caller derives itself."""
    if kind not in _SECTIONS:
        raise ValueError(f"unknown stage kind {kind!r}; valid: {sorted(_SECTIONS)}")
    flat = _flatten(to_dict(cfg))
    wanted = set(_KEYS.get(kind, ()))
    if kind == "sft" and eval_source(cfg, cfg.sft).path:
        wanted |= set(_SFT_EVAL) | {k for k in flat if k.startswith("rewards.")}
    sections = _SECTIONS[kind]
    dropped = OPERATIONAL | set(_SHADOWED.get(kind, ())) | set(exclude)
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if (key.split(".")[0] in sections or key in wanted) and key not in dropped:
            out[key] = value
    for key in sorted(PATH_KEYS & set(out)):
        if out[key]:
            out[key] = str(Path(out[key]).expanduser().resolve())
    for key in CONTENT_KEYS:
        path = out.get(key)
        if path and Path(path).is_file():
            out[f"{key}#sha256"] = file_sha256(path)
    return json.loads(json.dumps(out, sort_keys=True))  # JSON values, as they are read back from disk


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short digest of a settings mapping (SHA-256 of its canonical JSON, 16 hex digits)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else (v or '""')
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def diff_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key old -> new` for every key both record with different values (a content digest shown short)."""
    out = []
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            a, b = old[key], new[key]
            if key.endswith("#sha256"):
                a, b = str(a)[:12], str(b)[:12]
            out.append(f"{key} {_show(a)} -> {_show(b)}")
    return out


def describe_diff(diff: list[str], limit: int = 6) -> str:
    """The differences as one line: the first `limit`, then how many more."""
    shown = ", ".join(diff[:limit])
    return shown + (f" (and {len(diff) - limit} more)" if len(diff) > limit else "")


def read_fingerprint(path: str | Path) -> dict | None:
    """The recorded settings in a fingerprint file (or a pipeline marker holding one), None when absent or
    unreadable (a file of an older pebr)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = data.get("fingerprint", {}).get("settings") if isinstance(data, dict) else None
    return settings if isinstance(settings, dict) else None


def fingerprint_record(stage: str, settings: Mapping[str, Any]) -> dict:
    """What is stored: format, stage, digest and the settings."""
    return {"format": FORMAT, "stage": stage, "digest": settings_digest(settings), "settings": dict(settings)}
