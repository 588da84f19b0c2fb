"""Training checkpoints on disk: atomic saves, keep-last-M pruning, finding the newest complete one, and
what a stage puts inside (`StageCheckpoints`: the actor and the trainer state).

A checkpoint is a directory `step_<N>/` under the run's `checkpoints/` folder. It is written as
`.tmp-step_<N>/` and renamed into place only when everything inside is written, and a `COMPLETE` marker
is the last file written before the rename, so a crash mid-save leaves only a temporary directory (removed
at the next save) and never corrupts or hides the last good checkpoint. What goes inside (the actor's
distributed checkpoint, the trainer state: step, data position, RNG states) is `StageCheckpoints`' business.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pebr_mega.actor.megatron_actor import MegatronActor
from pebr_mega.errors import CheckpointError
from pebr_mega.parallel.groups import barrier, rank

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE = "COMPLETE"


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
        """The newest complete checkpoint directory, or None."""
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

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
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.tmp_path(step)
        tmp.mkdir()
        return tmp

    def tmp_path(self, step: int) -> Path:
        """Where `step`'s checkpoint is written before it is published."""
        return self.root / f".tmp-step_{step}"

    def commit(self, step: int, meta: dict | None = None) -> Path:
        """Mark `step`'s temporary directory complete and publish it as `step_<step>`; prune old ones."""
        tmp = self.tmp_path(step)
        (tmp / COMPLETE).write_text(json.dumps({"step": step, **(meta or {})}) + "\n")
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
        self._prune()
        return final

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            shutil.rmtree(self.path(step), ignore_errors=True)

    def require(self, path: str | Path) -> Path:
        """Validate a checkpoint directory given by the user; CheckpointError if it is not complete."""
        p = Path(path)
        if not (p / COMPLETE).is_file():
            raise CheckpointError(f"{p} is not a complete checkpoint (no {COMPLETE} marker)")
        return p


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
        """Checkpoint the actor and `state` (plus step and RNG states) atomically; collective over all ranks."""
        if rank() == 0:
            self.manager.prepare(step)
        barrier()
        tmp = self.manager.tmp_path(step)
        actor.save(tmp / "actor")
        if rank() == 0:
            torch.save({**state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
            self.manager.commit(step, {"stage": self.stage})
        barrier()

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
