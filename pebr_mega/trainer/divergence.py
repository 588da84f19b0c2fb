"""The divergence guard: a run whose updates are mostly skipped as non-finite, or whose weights stop being finite,
stops before it saves or exports that model.

A non-finite loss or gradient skips its update (`MegatronActor.train_step`), which keeps one bad batch from
ruining a run; a run whose updates keep failing, though (a learning rate far too high, a reward that is never
finite), used to go on skipping, finish with status 0 and export its last weights as the stage's model. The guard
counts, from the start of this process (a resumed run counts afresh), the updates applied (the actor's counter)
and those skipped (each step's `skipped_updates`), and stops the run with `DivergedError` when, at a step
boundary:

- a weight is not finite (checked on every rank, one all-reduce), or
- at least 2 updates were skipped and more were skipped than applied;

and, before the final save and export, when any update was skipped and more were skipped than applied. The stop
comes before that step's save: the newest checkpoint stays what it was, the resume point of a rerun.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pebr_mega.errors import PebrError

MIN_SKIPPED = 2  # a single skipped update is a bad batch, not a diverged run


class DivergedError(PebrError):
    """The run diverged: its updates are mostly skipped as non-finite, or its weights are not finite."""


@dataclass
class DivergenceGuard:
    """Counts applied and skipped updates of one process's run; `check` and `check_final` raise `DivergedError`."""

    stage: str
    lr_key: str  # the setting to lower, named in the message
    applied_at_start: int = 0  # the actor's update counter when this process started (after a resume)
    skipped: int = 0

    def observe(self, metrics: dict[str, float]) -> None:
        """Count the updates the step skipped (`skipped_updates`, absent when it ran none)."""
        value = metrics.get("skipped_updates") or 0.0
        self.skipped += int(value)

    def applied(self, actor_updates: int) -> int:
        """Updates applied by this process: the actor's counter since the start."""
        return actor_updates - self.applied_at_start

    def check(self, step: int, actor_updates: int, weights_finite: bool, where: Callable[[], str]) -> None:
        """At the boundary after `step`: raise when the weights are not finite or the updates mostly skipped.
        `where()` says where a rerun resumes (asked only when the run stops)."""
        if not weights_finite:
            self._stop(step, "the weights are no longer finite (an applied update overflowed them)", where)
        applied = self.applied(actor_updates)
        if self.skipped >= MIN_SKIPPED and self.skipped > applied:
            self._stop(step, self._tally(applied), where)

    def check_final(self, step: int, actor_updates: int, where: Callable[[], str]) -> None:
        """Before the final save and export: raise when any update was skipped and more skipped than applied."""
        applied = self.applied(actor_updates)
        if self.skipped and self.skipped > applied:
            self._stop(step, self._tally(applied), where)

    def _tally(self, applied: int) -> str:
        total = applied + self.skipped
        return f"{self.skipped} of {total} updates were skipped as non-finite (loss or gradient)"

    def _stop(self, step: int, why: str, where: Callable[[], str]) -> None:
        raise DivergedError(f"{self.stage} diverged at step {step}: {why}; the model is neither saved nor exported, "
                            f"{where()} (lower {self.lr_key}, or look at the data, and rerun with --force-restart)")
