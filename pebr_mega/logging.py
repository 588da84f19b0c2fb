"""Metrics: a progress bar with ETA, one readable console line per step, `metrics.jsonl`, wandb, plots.

`MetricsLogger` is the only sink trainers write metrics to. wandb is optional: `mode: disabled` (default),
`offline` (writes a local run directory, needs no network, sync later with `wandb sync`) or `online`; so is
TensorBoard (`logging.tensorboard: true`: event files in `run_dir/tensorboard`, `pip install tensorboard`).
`logging.metric_names: verl` gives wandb and TensorBoard the names verl and EasyR1 dashboards plot
(`VERL_NAMES`: `actor/pg_loss`, `critic/score/mean`, `timing_s/step`, ...); `metrics.jsonl`, the console and
`pebr plot` keep ours, so that one run directory reads the same whichever names its dashboards use.

`log_generations` writes `logging.log_generations` sampled prompt/response/reward rows per step to
`generations.jsonl` in the run directory and, when wandb is on, as a `generations` table (upstream EasyR1
logs a few validation generations the same way: `trainer.val_generations_to_log`).

Resuming (`MetricsLogger(resume=True, start_step=k)`): a killed run may have logged steps after its newest
checkpoint; the resumed run repeats them. Both files are therefore cut back to the rows of steps <= k
(rewritten aside and renamed into place, so a kill during the cut leaves the old file or the new one) before
the first new row, and the run's rows come out exactly once per step. wandb continues the same run: its id is
kept in `wandb-run-id` in the run directory and passed back to `wandb.init(id=..., resume="allow")`. wandb
itself keeps the first value logged at a step and ignores a later one for a step it has seen (with a
warning), so the steps a killed run logged after its checkpoint keep the values of the first try there;
the run's own record, `metrics.jsonl`, holds the resumed values.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pebr_mega.config_fields import check_fields, choice
from pebr_mega.errors import BackendUnavailableError, storage_errors
from pebr_mega.outputs import write_text_atomic
from pebr_mega.parallel.groups import is_main_rank

# The keys shown on the console line, in order, with their format; everything goes to metrics.jsonl.
CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("reward/total", "reward {:.3f}"),
    ("reward/accuracy", "acc {:.3f}"),
    ("loss", "loss {:.4f}"),
    ("kl", "kl {:.4f}"),
    ("entropy", "ent {:.3f}"),
    ("clip_frac", "clip {:.3f}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("response_length/mean", "len {:.0f}"),
    ("tokens_per_s", "{:.0f} tok/s"),
    ("time/step", "{:.1f}s/step"),
)
# verl's / EasyR1's name for each of our metrics with the same meaning (verl `dp_actor.update_policy`,
# `trainer/metric_utils.compute_data_metrics` and `compute_timing_metrics`; EasyR1's `ray_trainer.py`).
# Unlisted metrics keep their names; `kl` and `kl_loss` are the same value (the KL term before its coefficient,
# as verl's `actor/kl_loss`); `time/logprobs` covers the old and the reference log-probs together (on policy, one
# update per step, the old ones come from the update's own forward: then the reference's only).
VERL_NAMES: dict[str, str] = {
    "loss": "actor/loss", "pg_loss": "actor/pg_loss", "kl_loss": "actor/kl_loss", "kl": "actor/kl_loss",
    "entropy": "actor/entropy", "clip_frac": "actor/pg_clipfrac", "clip_frac_dual": "actor/pg_clipfrac_lower",
    "approx_kl": "actor/ppo_kl", "grad_norm": "actor/grad_norm", "lr": "actor/lr",
    "reward/total": "critic/score/mean", "advantage/abs_mean": "critic/advantages/abs_mean",
    "time/rollout": "timing_s/gen", "time/reward": "timing_s/reward", "time/logprobs": "timing_s/old_log_prob",
    "time/update": "timing_s/update_actor", "time/sync": "timing_s/sync_weights", "time/step": "timing_s/step",
}


def external_names(metrics: Mapping[str, Any], names: str) -> dict[str, Any]:
    """`metrics` under the names the dashboards use: ours (`names="pebr"`) or verl's (`"verl"`, `VERL_NAMES`)."""
    if names == "pebr":
        return dict(metrics)
    return {VERL_NAMES.get(k, k): v for k, v in metrics.items()}


# Counts of skipped work, shown on the console line only when not zero.
COUNT_KEYS = (
    ("skipped_batches", "batch skipped: no buildable request"),
    ("skipped_updates", "{:.0f} updates skipped: non-finite"),
)


@dataclass
class LoggingConfig:
    """Where metrics go."""

    wandb_mode: str = choice("disabled", ["disabled", "offline", "online"])
    wandb_project: str = "pebr-mega"
    wandb_run_name: str = ""
    progress_bar: bool = True
    console_every: int = 1
    extra_console_keys: list[str] = field(default_factory=list)
    log_generations: int = 0  # rollout samples (prompt, response, reward) logged per GRPO step; 0 = none
    tensorboard: bool = False  # event files in run_dir/tensorboard (needs `pip install tensorboard`)
    # Metric names in wandb and TensorBoard: ours, or verl's/EasyR1's (VERL_NAMES); metrics.jsonl keeps ours.
    metric_names: str = choice("pebr", ["pebr", "verl"])

    def __post_init__(self) -> None:
        check_fields("logging", {
            "log_generations": (self.log_generations >= 0, self.log_generations, "must be >= 0"),
            "console_every": (self.console_every >= 1, self.console_every, "must be >= 1"),
        })


GENERATIONS_FILE = "generations.jsonl"
WANDB_ID_FILE = "wandb-run-id"
GENERATION_COLUMNS = ("step", "qid", "prompt", "response", "reward", "answer")

def format_metrics_line(step: int, total: int | None, metrics: Mapping[str, Any], extra_keys: Sequence[str] = ()) -> str:
    """One readable line: `step 3/10 | reward 0.512 | acc 0.375 | ...` with the keys that are present."""
    head = f"step {step}/{total}" if total else f"step {step}"
    parts = [head]
    for key, fmt in CONSOLE_KEYS:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append(fmt.format(v))
    for key, fmt in COUNT_KEYS:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v) and v:
            parts.append(fmt.format(v))
    for key in extra_keys:
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4g}" if isinstance(metrics[key], float) else f"{key} {metrics[key]}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes each step's metrics to the console, `run_dir/metrics.jsonl` and wandb when enabled."""

    def __init__(self, cfg: LoggingConfig, run_dir: str | Path, total_steps: int | None = None,
                 run_config: Mapping[str, Any] | None = None, desc: str = "train", resume: bool = False,
                 start_step: int = 0) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total = total_steps
        self.path = self.run_dir / "metrics.jsonl"
        for own in (self.path, self.run_dir / GENERATIONS_FILE):
            if resume:
                truncate_steps(own, start_step)
            else:
                own.unlink(missing_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._t0 = time.time()
        self._bar = None
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, file=sys.stderr)
        self._wandb = self._init_wandb(run_config, resume) if cfg.wandb_mode != "disabled" else None
        self._tensorboard = self._init_tensorboard() if cfg.tensorboard else None

    def _init_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise BackendUnavailableError(f"logging.tensorboard=true but TensorBoard does not import ({e}); "
                                          "pip install tensorboard") from None
        # A resumed run appends a new event file; TensorBoard shows the later value of a step logged twice.
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _init_wandb(self, run_config: Mapping[str, Any] | None, resume: bool):
        try:
            import wandb
        except ImportError as e:
            raise BackendUnavailableError(f"logging.wandb_mode={self.cfg.wandb_mode} but wandb does not import "
                                          f"({e}); pip install wandb") from None
        return wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name or None,
                          mode=self.cfg.wandb_mode, dir=str(self.run_dir), config=dict(run_config or {}),
                          id=self.wandb_run_id(resume), resume="allow",
                          reinit="finish_previous")

    def wandb_run_id(self, resume: bool) -> str:
        """The wandb run id of this run directory: the stored one when resuming, else a new one (stored).
        (A new id comes from the OS's randomness: drawing it must not move the seeded generators.)"""
        path = self.run_dir / WANDB_ID_FILE
        if resume and path.is_file():
            stored = path.read_text(encoding="utf-8").strip()
            if stored:
                return stored
        run_id = uuid.uuid4().hex[:16]
        write_text_atomic(path, run_id + "\n")
        return run_id

    def _write_row(self, step: int, line: str) -> None:
        """Append one row to `metrics.jsonl`; a disk that refuses it (full, read-only) is a `StorageError` naming
        the file (a torn row it leaves is cut by the resume, `truncate_steps`)."""
        with storage_errors(f"writing the metrics of step {step}", self.path,
                            "the newest checkpoint is intact: free the space and rerun the same command to resume "
                            "from it", catch=(OSError,), cleanup=self._close_quietly):
            self._file.write(line)
            self._file.flush()

    def _close_quietly(self) -> None:
        with contextlib.suppress(OSError):  # closing flushes the rest again, which fails again
            self._file.close()

    def log(self, step: int, metrics: Mapping[str, Any], console: bool = True) -> None:
        """Record one step's metrics (numbers; non-finite values are written as null).

        `console=False` records extra metrics of a step already logged (a periodic evaluation): file and
        wandb only, without a console line or a progress-bar tick.
        """
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        self._write_row(step, json.dumps({"step": step, "wall": round(time.time() - self._t0, 3), **clean}) + "\n")
        shown = external_names({k: v for k, v in clean.items() if v is not None}, self.cfg.metric_names)
        if self._wandb is not None:
            self._wandb.log(shown, step=step)
        if self._tensorboard is not None:
            for key, value in shown.items():
                if _is_number(value):
                    self._tensorboard.add_scalar(key, value, global_step=step)
            self._tensorboard.flush()
        if not console:
            return
        line = format_metrics_line(step, self.total, metrics, self.cfg.extra_console_keys)
        if self._bar is not None:
            self._bar.update(1)
            if step % max(1, self.cfg.console_every) == 0:
                self._bar.write(line)
        elif step % max(1, self.cfg.console_every) == 0:
            print(line, flush=True)

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Flush and close every sink."""
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def log_generations(cfg: LoggingConfig, run_dir: str | Path, step: int, rows: Sequence[Mapping[str, Any]]) -> int:
    """Append the first `cfg.log_generations` of `rows` (dicts with at least the `GENERATION_COLUMNS` other
    than `step`) to `run_dir/generations.jsonl`, and log them as the wandb table `generations` when a wandb
    run is active. Only rank 0 writes. Returns the number of rows written."""
    rows = list(rows)[: max(cfg.log_generations, 0)]
    if not rows or not is_main_rank():
        return 0
    records = [{"step": step, **{k: _jsonable(v) for k, v in row.items()}} for row in rows]
    with (Path(run_dir) / GENERATIONS_FILE).open("a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    if cfg.wandb_mode != "disabled":
        import wandb

        if wandb.run is not None:
            table = wandb.Table(columns=list(GENERATION_COLUMNS),
                                data=[[rec.get(c) for c in GENERATION_COLUMNS] for rec in records])
            wandb.run.log({"generations": table}, step=step)
    return len(records)


def truncate_steps(path: str | Path, last_step: int) -> bool:
    """Cut a JSONL file of `{"step": ...}` rows back to the rows of steps <= `last_step`, atomically (written
    aside, then renamed); a torn line (a run killed mid-write) goes too. Returns whether the file changed."""
    p = Path(path)
    if not p.is_file():
        return False
    text = p.read_text(encoding="utf-8")
    kept, changed = [], not text.endswith("\n") and bool(text)
    for line in text.splitlines():
        try:
            row = json.loads(line)
            keep = isinstance(row, dict) and _is_number(row.get("step")) and row["step"] <= last_step
        except json.JSONDecodeError:
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            changed = True
    if changed:
        write_text_atomic(p, "".join(kept))
    return changed


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _jsonable(x) for k, x in v.items()}
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


DEFAULT_PLOT_KEYS = ("reward/total", "reward/accuracy", "response_length/mean", "kl", "entropy", "grad_norm")


def plot_metrics(metrics_files: Iterable[str | Path], out_png: str | Path, keys: Sequence[str] = DEFAULT_PLOT_KEYS,
                 labels: Sequence[str] | None = None) -> Path:
    """Draw each key's curve against step (one panel per key, one line per file) into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = [Path(f) for f in metrics_files]
    runs = [read_metrics(f) for f in files]
    for f, rows in zip(files, runs):
        bad = [i for i, r in enumerate(rows) if not isinstance(r, dict) or not _is_number(r.get("step"))]
        if bad:
            raise ValueError(f"{f}: {len(bad)} of {len(rows)} records have no numeric 'step' (the first is record "
                             f"{bad[0] + 1}); is this a pebr metrics.jsonl?")
    present = [k for k in keys if any(k in r for rows in runs for r in rows)]
    if not present:
        raise ValueError(f"none of the keys {list(keys)} appear in {[str(f) for f in files]}")
    cols = min(3, len(present))
    rows_n = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.2 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, present):
        for i, rows in enumerate(runs):
            pts = [(r["step"], r[key]) for r in rows if _is_number(r.get(key))]
            if pts:
                label = labels[i] if labels else files[i].parent.name
                ax.plot(*zip(*pts), marker=".", label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    if len(files) > 1:
        axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
