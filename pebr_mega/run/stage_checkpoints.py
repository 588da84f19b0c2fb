"""Training checkpoints on disk: atomic saves, keep-last-M pruning, verified loading of the newest intact one.

A checkpoint is a directory `step_<N>/` under the run's `checkpoints/` folder. It is written as
`.tmp-step_<N>/` and renamed into place only when everything inside is written, so a crash mid-save leaves
only a temporary directory (removed at the next save) and never corrupts or hides the last good checkpoint.
What goes inside (the actor's distributed checkpoint, the trainer state: step, data position, RNG states)
is `StageCheckpoints`' business.

The last two files of a commit are `COMPLETE` (step and caller's meta) and `MANIFEST.json`: the relative
path, size and SHA-256 of every other file. A checkpoint damaged after its commit (a truncated or emptied
file, a missing Megatron `.metadata`, overwritten bytes) fails `verify_checkpoint`; `latest()` then warns
naming it and falls back to the newest intact one, instead of a raw unpickling error or weights that load
silently and train into NaNs. The manifest is `pebr_mega.checkpoint.manifest`'s, which every other reader of
a checkpoint (export, conversion, evaluation, logit comparison) checks too; its docstring has the cost.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.distributed as dist

from pebr_mega.checkpoint.manifest import (MANIFEST, MANIFEST_FORMAT, files_key, known_intact, remember_intact,
                                           verify_checkpoint, write_manifest)
from pebr_mega.errors import storage_errors
from pebr_mega.parallel.groups import barrier, is_main_rank

if TYPE_CHECKING:  # annotations only: reading a run's checkpoint steps (a dry run) needs no Megatron
    from pebr_mega.actor.megatron_actor import MegatronActor

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"
__all__ = ["COMPLETE", "MANIFEST", "MANIFEST_FORMAT", "CheckpointManager", "CheckpointWarning", "StageCheckpoints",
           "verify_checkpoint", "write_manifest"]


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged) or could not be verified; the message names it."""


class CheckpointManager:
    """Manages `root/step_<N>` checkpoint directories of one run."""

    def __init__(self, root: str | Path, keep_last: int = 2) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / COMPLETE).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint that passes `verify_checkpoint`, or None.

        A damaged newer one is skipped with a `CheckpointWarning` naming it and what is wrong. One written
        without a manifest (before verification existed) is used as it is, with a warning. In a distributed
        job rank 0 alone reads and hashes the files and the others take its verdict (one broadcast): every
        rank loads the same checkpoint, and the files are read once, not once per rank.
        """
        step = self._newest_intact() if is_main_rank() else None
        if dist.is_initialized() and dist.get_world_size() > 1:
            verdict = [step]
            dist.broadcast_object_list(verdict, src=0)
            step = verdict[0]
        return None if step is None else self.path(step)

    def _newest_intact(self) -> int | None:
        self._recover()
        for step in reversed(self.steps()):
            problem = self._problem(step)
            if problem is None:
                return step
            path = self.path(step)
            if problem == f"no {MANIFEST}":
                warnings.warn(f"checkpoint {path} has no {MANIFEST} (written before checkpoints were verified): "
                              "loading it unverified", CheckpointWarning, stacklevel=3)
                return step
            warnings.warn(f"checkpoint {path} is damaged ({problem}); falling back to an older one",
                          CheckpointWarning, stacklevel=3)
        return None

    def _problem(self, step: int) -> str | None:
        """`verify_checkpoint` of `step`, remembered while none of its files changed (size and mtime): a
        checkpoint is hashed at most once per process (at its commit or when first needed), and any later
        write to one of its files makes it hashed again."""
        key = files_key(self.path(step))
        if known_intact(key):
            return None
        problem = verify_checkpoint(self.path(step))
        if problem is None:
            remember_intact(key)
        return problem

    def path(self, step: int) -> Path:
        """Directory of the checkpoint of `step` (whether or not it exists)."""
        return self.root / f"step_{step}"

    def save(self, step: int, write: Callable[[Path], None], meta: dict | None = None) -> Path:
        """Call `write(tmp_dir)` to fill a fresh directory, then publish it atomically as `step_<step>`."""
        tmp = self.prepare(step)
        write(tmp)
        return self.commit(step, meta)

    def prepare(self, step: int) -> Path:
        """Create (empty) the temporary directory of `step`'s checkpoint; stale temporaries are removed.

        Multi-rank savers call `prepare` on one rank, let every rank write into `tmp_path(step)`, then `commit`.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()
        for stale in [*self.root.glob(".tmp-step_*"), *self.root.glob(".old-step_*"), *self.root.glob(".del-step_*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.tmp_path(step)
        tmp.mkdir()
        return tmp

    def tmp_path(self, step: int) -> Path:
        """Where `step`'s checkpoint is written before it is published."""
        return self.root / f".tmp-step_{step}"

    def commit(self, step: int, meta: dict | None = None) -> Path:
        """Mark `step`'s temporary directory complete, write its manifest (the last file), publish it as
        `step_<step>` and prune old ones."""
        tmp = self.tmp_path(step)
        (tmp / COMPLETE).write_text(json.dumps({"step": step, **(meta or {})}) + "\n")
        write_manifest(tmp)
        final = self.path(step)
        if final.exists():
            # Re-saving a step (e.g. after a resume): move the old one aside first so that a crash between
            # the two renames still leaves one complete copy.
            old = self.root / f".old-step_{step}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        remember_intact(files_key(final))  # its files were just hashed
        self._prune()
        return final

    def _recover(self) -> None:
        """A run killed between the two renames of a re-save left the old copy as `.old-step_N` and no
        `step_N`: put it back."""
        for old in self.root.glob(".old-step_*") if self.root.is_dir() else ():
            final = self.root / old.name[len(".old-"):]
            if not final.exists() and (old / COMPLETE).is_file():
                old.rename(final)

    def _prune(self) -> None:
        """Keep the `keep_last` newest intact checkpoints and remove every other one (damaged ones too: each
        was named in a warning when it was found). A damaged checkpoint never counts toward `keep_last`, so
        an intact older one is never removed in favour of it. Removal renames first, so a kill mid-way leaves
        no half-deleted checkpoint under a valid name."""
        steps = self.steps()
        if len(steps) <= self.keep_last:
            return
        kept = 0
        for step in reversed(steps):
            if kept < self.keep_last and self._problem(step) in (None, f"no {MANIFEST}"):
                kept += 1
                continue
            doomed = self.root / f".del-step_{step}"
            shutil.rmtree(doomed, ignore_errors=True)
            self.path(step).rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)


TRAINER_STATE = "trainer_state.pt"


class StageCheckpoints:
    """A stage's checkpoints: `step_<N>/actor/` (the actor, distributed) and `step_<N>/trainer_state.pt`
    (rank 0: step, data position, RNG states, and whatever else the stage keeps, e.g. its `eval_*` results)."""

    def __init__(self, root: str | Path, keep_last: int, stage: str) -> None:
        self.manager = CheckpointManager(root, keep_last=keep_last)
        self.stage = stage

    @property
    def root(self) -> Path:
        """The `checkpoints/` folder."""
        return self.manager.root

    def last_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        steps = self.manager.steps()
        return steps[-1] if steps else None

    def save(self, step: int, actor: MegatronActor, state: dict) -> None:
        """Checkpoint the actor and `state` (plus step and RNG states) atomically; collective over all ranks.

        A disk that refuses the save (full, read-only) is a `StorageError` naming the checkpoint and the newest
        one left intact; the unfinished temporary directory is removed (it would only hold the space)."""
        tmp = self.manager.tmp_path(step)
        with storage_errors(f"saving the checkpoint of step {step}", tmp, self._after_failed_save,
                            catch=(OSError, RuntimeError), cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
            if is_main_rank():
                self.manager.prepare(step)
            barrier()
            actor.save(tmp / "actor")
            if is_main_rank():
                torch.save({**state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
                self.manager.commit(step, {"stage": self.stage})
        barrier()

    def _after_failed_save(self) -> str:
        last = self.last_step()
        kept = f"the newest checkpoint is still {self.manager.path(last)}" if last is not None else \
            "no checkpoint was saved yet"
        return f"{kept}; free the space and rerun the same command to resume"

    def load_latest(self, actor: MegatronActor) -> dict | None:
        """Load the newest complete checkpoint into `actor`, restore the RNG states and return the trainer
        state (None when there is no checkpoint); collective over all ranks."""
        latest = self.manager.latest()
        if latest is None:
            return None
        actor.load(latest / "actor")
        state = torch.load(latest / TRAINER_STATE, weights_only=False)
        set_rng_state(state["rng"])
        return state


def rng_state() -> dict:
    """Python's, NumPy's, torch's (and CUDA's) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
