"""Difficulty split (PEBR_FACTS, recipe step 2): easy / medium / hard from n sampled answers per question.

Rollouts are JSONL, one line per sample: `{"qid": ..., "response": ..., "ground_truth": ..., "score": ...}`.
The score of a line is, in this order of precedence:

1. `score` when it is a number;
2. `score["accuracy"]` when `score` is an object (upstream's sampler writes its reward dict there);
3. a top-level `accuracy` number.

A sample is correct when its score >= `threshold` (default 1.0, i.e. exactly right). Per question with
exactly `n` samples: n correct -> easy, 1..n-1 -> medium, 0 -> hard.

Unlike upstream, nothing is dropped silently: a question whose sample count is not `n` (a re-run appended
to the file, a lost batch) is listed under `wrong_count` and NOT filed; questions without rollouts are
listed under `no_rollouts`; rollouts for qids absent from the dataset and malformed lines are counted and
listed. Every loaded dataset qid ends up in exactly one of easy/medium/hard/wrong_count/no_rollouts, and
the output files are rewritten, never appended to.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pebr_mega.data.records import (Columns, GRPORecord, Skip, load_grpo_records, read_json_items, save_records,
                                    write_json_atomic)
from pebr_mega.errors import DataError

SPLIT_FILES = {"easy": "easycase.json", "medium": "mediumcase.json", "hard": "hardcase.json"}


@dataclass
class Rollouts:
    """Scores per qid (in file order) and the lines that could not be used."""

    scores: dict[str, list[float]]
    malformed: list[Skip]
    lines: int  # non-blank lines read


@dataclass
class SplitResult:
    """Where every dataset question went, plus what in the rollouts did not match the dataset."""

    n: int
    threshold: float
    easy: list[GRPORecord] = field(default_factory=list)
    medium: list[GRPORecord] = field(default_factory=list)
    hard: list[GRPORecord] = field(default_factory=list)
    wrong_count: dict[str, int] = field(default_factory=dict)  # qid -> number of samples found (!= n)
    no_rollouts: list[str] = field(default_factory=list)
    unknown_qids: dict[str, int] = field(default_factory=dict)  # qid not in the dataset -> number of lines
    malformed: list[Skip] = field(default_factory=list)
    dataset_skipped: list[Skip] = field(default_factory=list)  # records the dataset loader rejected
    correct_histogram: dict[int, int] = field(default_factory=dict)  # #correct -> #questions (filed ones)

    def counts(self) -> dict[str, int]:
        """Questions per outcome."""
        return {"easy": len(self.easy), "medium": len(self.medium), "hard": len(self.hard),
                "wrong_count": len(self.wrong_count), "no_rollouts": len(self.no_rollouts)}

    def summary(self) -> dict[str, Any]:
        """Everything needed to audit the split, as JSON-ready data."""
        return {
            "n": self.n, "threshold": self.threshold, "counts": self.counts(),
            "correct_histogram": {str(k): v for k, v in sorted(self.correct_histogram.items())},
            "wrong_count": self.wrong_count, "no_rollouts": self.no_rollouts,
            "unknown_qids": self.unknown_qids,
            "malformed_lines": [{"location": s.location, "reason": s.reason, "detail": s.detail}
                                for s in self.malformed],
            "dataset_skipped": [{"location": s.location, "reason": s.reason, "qid": s.qid, "detail": s.detail}
                                for s in self.dataset_skipped],
        }


def _number(v: Any) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def rollout_score(line: dict[str, Any]) -> float | None:
    """The score of one rollout line by the precedence in the module docstring; None when there is none."""
    score = line.get("score")
    if isinstance(score, dict):
        return _number(score.get("accuracy"))
    if score is not None:
        return _number(score)
    return _number(line.get("accuracy"))


def load_rollouts(path: str | Path) -> Rollouts:
    """Read rollout lines; lines without a usable qid or score are counted as malformed, not fatal."""
    items, malformed = read_json_items(path)
    scores: dict[str, list[float]] = defaultdict(list)
    for item in items:
        line = item.value
        if not isinstance(line, dict):
            malformed.append(Skip("not_an_object", item.location))
            continue
        qid = line.get("qid")
        if not isinstance(qid, (str, int)) or isinstance(qid, bool) or qid == "":
            malformed.append(Skip("no_qid", item.location, detail=f"qid={qid!r}"))
            continue
        score = rollout_score(line)
        if score is None:
            malformed.append(Skip("no_score", item.location, str(qid),
                                  "need a numeric 'score', 'score.accuracy' or 'accuracy'"))
            continue
        scores[str(qid)].append(score)
    malformed.sort(key=lambda s: int(s.location.split()[-1]))
    return Rollouts(dict(scores), malformed, len(items) + sum(s.reason == "malformed_json" for s in malformed))


def split_by_difficulty(records: Iterable[GRPORecord], rollouts: Rollouts, n: int = 8,
                        threshold: float = 1.0) -> SplitResult:
    """File each record by how many of its `n` samples scored >= `threshold` (records keep dataset order)."""
    if n < 1:
        raise DataError(f"n must be >= 1, got {n}")
    result = SplitResult(n=n, threshold=threshold, malformed=list(rollouts.malformed))
    known: set[str] = set()
    hist: Counter = Counter()
    for rec in records:
        known.add(rec.qid)
        scores = rollouts.scores.get(rec.qid)
        if not scores:
            result.no_rollouts.append(rec.qid)
            continue
        if len(scores) != n:
            result.wrong_count[rec.qid] = len(scores)
            continue
        correct = sum(s >= threshold for s in scores)
        hist[correct] += 1
        bucket = result.easy if correct == n else result.hard if correct == 0 else result.medium
        bucket.append(rec)
    result.unknown_qids = {q: len(s) for q, s in rollouts.scores.items() if q not in known}
    result.correct_histogram = dict(hist)
    return result


def split_files(rollouts_path: str | Path, dataset_path: str | Path, out_dir: str | Path, n: int = 8,
                threshold: float = 1.0, columns: Columns = Columns()) -> SplitResult:
    """Split `dataset_path` (its problem, answer and image columns named by `columns`) by `rollouts_path`; write
    easycase/mediumcase/hardcase.json (in pebr's layout) and summary.json."""
    # No image is read here: where images may live is checked by the stage that trains on the split files.
    loaded = load_grpo_records(dataset_path, allow_outside_root=True, columns=columns)
    result = split_by_difficulty(loaded.records, load_rollouts(rollouts_path), n, threshold)
    result.dataset_skipped = loaded.skipped
    out = Path(out_dir)
    for name, fname in SPLIT_FILES.items():
        save_records(out / fname, getattr(result, name))
    write_json_atomic(out / "summary.json", result.summary())
    return result


def format_summary(result: SplitResult, out_dir: str | Path, max_listed: int = 10) -> list[str]:
    """Readable summary lines for the console."""
    def listed(qids: list[str]) -> str:
        return ", ".join(qids[:max_listed]) + (f", ... ({len(qids) - max_listed} more)" if len(qids) > max_listed else "")

    out = Path(out_dir)
    c = result.counts()
    lines = [f"{'easy':<14}{c['easy']:>8}  -> {out / SPLIT_FILES['easy']}",
             f"{'medium':<14}{c['medium']:>8}  -> {out / SPLIT_FILES['medium']}",
             f"{'hard':<14}{c['hard']:>8}  -> {out / SPLIT_FILES['hard']}",
             f"{'wrong_count':<14}{c['wrong_count']:>8}  (not filed: sample count != {result.n})",
             f"{'no_rollouts':<14}{c['no_rollouts']:>8}"]
    if result.wrong_count:
        lines.append("  wrong count: " + listed([f"{q} ({k})" for q, k in result.wrong_count.items()]))
    if result.no_rollouts:
        lines.append("  no rollouts: " + listed(result.no_rollouts))
    lines.append(f"{'unknown_qids':<14}{len(result.unknown_qids):>8}  "
                 f"({sum(result.unknown_qids.values())} rollout lines for qids not in the dataset)")
    if result.unknown_qids:
        lines.append("  unknown: " + listed(list(result.unknown_qids)))
    lines.append(f"{'malformed':<14}{len(result.malformed):>8}  rollout lines")
    if result.dataset_skipped:
        lines.append(f"{'dataset_skip':<14}{len(result.dataset_skipped):>8}  dataset records rejected at load")
    lines.append(f"summary -> {out / 'summary.json'}")
    return lines
