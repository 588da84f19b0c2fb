"""Metrics logger: one readable line per step, metrics.jsonl, plots, wandb offline without network."""
from __future__ import annotations

import json
import math

from pebr_mega.logging import (GENERATIONS_FILE, WANDB_ID_FILE, LoggingConfig, MetricsLogger, format_metrics_line,
                               plot_metrics, read_metrics)


def test_line_shows_present_keys_in_order():
    line = format_metrics_line(3, 10, {"loss": 0.25, "reward/total": 0.5, "kl": float("nan"), "time/step": 2.0})
    assert line == "step 3/10 | reward 0.500 | loss 0.2500 | 2.0s/step"


def test_skipped_work_shows_on_the_line_only_when_there_is_some():
    assert "skipped" not in format_metrics_line(1, 2, {"loss": 0.5, "skipped_batches": 0.0, "skipped_updates": 0.0})
    line = format_metrics_line(2, 2, {"skipped_batches": 1.0, "skipped_updates": 2.0})
    assert "batch skipped: no buildable request" in line and "2 updates skipped" in line


def test_jsonl_written_and_torn_line_skipped(tmp_path, capsys):
    log = MetricsLogger(LoggingConfig(progress_bar=False), tmp_path, total_steps=2)
    log.log(1, {"reward/total": 0.1, "kl": float("inf")})
    log.log(2, {"reward/total": 0.3})
    log.close()
    out = capsys.readouterr().out
    assert "step 1/2 | reward 0.100" in out and "step 2/2 | reward 0.300" in out
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "rew')
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] is None


def test_extra_metrics_of_a_logged_step_skip_the_console_and_the_bar(tmp_path, capsys):
    log = MetricsLogger(LoggingConfig(progress_bar=True), tmp_path, total_steps=2)
    log.log(1, {"reward/total": 0.1})
    log.log(1, {"eval/accuracy": 0.5}, console=False)
    assert log._bar.n == 1
    log.close()
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("step 1/2 |") == 1
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 1] and rows[1]["eval/accuracy"] == 0.5


def test_resume_appends_and_fresh_run_truncates(tmp_path):
    for resume, start, expect in ((False, 0, [1]), (True, 1, [1, 2]), (False, 0, [1])):
        log = MetricsLogger(LoggingConfig(progress_bar=False), tmp_path, resume=resume, start_step=start)
        log.log(start + 1, {"loss": 1.0})
        log.close()
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == expect


def test_resume_cuts_metrics_and_generations_back_to_the_resumed_step(tmp_path):
    # A run killed after logging steps 1-4 (and half a row) whose newest checkpoint is step 2.
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    (tmp_path / GENERATIONS_FILE).write_text("".join(json.dumps({"step": s, "qid": "q"}) + "\n" for s in (1, 3)))
    log = MetricsLogger(LoggingConfig(progress_bar=False), tmp_path, resume=True, start_step=2)
    for s in (3, 4, 5):
        log.log(s, {"loss": 10.0 * s})
    log.close()
    got = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and got[2]["loss"] == 30.0
    assert [r["step"] for r in read_metrics(tmp_path / GENERATIONS_FILE)] == [1]
    assert not list(tmp_path.glob(".*.tmp"))  # the cut went through a renamed temporary file


def test_wandb_run_id_is_kept_across_a_resume(tmp_path):
    log = MetricsLogger(LoggingConfig(progress_bar=False), tmp_path)
    first = log.wandb_run_id(resume=False)
    assert log.wandb_run_id(resume=True) == first and (tmp_path / WANDB_ID_FILE).read_text().strip() == first
    assert log.wandb_run_id(resume=False) != first  # a fresh run is a new wandb run
    log.close()


def test_plot_writes_png(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/total": scale * math.sin(s)}) + "\n"
                                                 for s in range(5)))
    png = plot_metrics([tmp_path / "a" / "metrics.jsonl", tmp_path / "b" / "metrics.jsonl"], tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wandb_offline_writes_local_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLogger(LoggingConfig(wandb_mode="offline", progress_bar=False), tmp_path, run_config={"x": 1})
    log.log(1, {"loss": 0.5})
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def _rows(n, tag=""):
    return [{"qid": f"q{i}", "prompt": f"p{i}{tag}", "response": f"r{i}", "reward": i / 10, "answer": "1",
             "components": {"accuracy": float("nan")}} for i in range(n)]


def test_generations_are_written_n_per_step_and_a_fresh_run_starts_over(tmp_path):
    from pebr_mega.logging import GENERATIONS_FILE, log_generations

    cfg = LoggingConfig(progress_bar=False, log_generations=2)
    log = MetricsLogger(cfg, tmp_path)
    assert log_generations(cfg, tmp_path, 1, _rows(5)) == 2
    assert log_generations(cfg, tmp_path, 2, _rows(1, "b")) == 1
    assert log_generations(LoggingConfig(log_generations=0), tmp_path, 3, _rows(5)) == 0
    log.close()
    rows = [json.loads(line) for line in (tmp_path / GENERATIONS_FILE).read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(1, "p0"), (1, "p1"), (2, "p0b")]
    assert rows[0]["reward"] == 0.0 and rows[1]["response"] == "r1" and rows[0]["components"] == {"accuracy": None}
    MetricsLogger(cfg, tmp_path, resume=True).close()
    assert (tmp_path / GENERATIONS_FILE).is_file()
    MetricsLogger(cfg, tmp_path).close()  # a fresh run in the same directory
    assert not (tmp_path / GENERATIONS_FILE).exists()


def test_generations_go_to_a_wandb_table_offline(tmp_path, monkeypatch):
    from pebr_mega.logging import log_generations

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggingConfig(wandb_mode="offline", progress_bar=False, log_generations=3)
    log = MetricsLogger(cfg, tmp_path)
    assert log_generations(cfg, tmp_path, 1, _rows(4)) == 3
    log.log(1, {"loss": 0.5})
    log.close()
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/generations_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "qid", "prompt", "response", "reward", "answer"]
    assert [row[1] for row in table["data"]] == ["q0", "q1", "q2"]


def _tensorboard_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the event files under `log_dir`, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_sink_with_verl_metric_names(tmp_path):
    """Issue 24, item 6: TensorBoard beside wandb, and verl/EasyR1's metric names on the dashboards while
    metrics.jsonl keeps ours; values that are not finite numbers are left out of the event file."""
    import pytest

    pytest.importorskip("tensorboard")
    cfg = LoggingConfig(progress_bar=False, tensorboard=True, metric_names="verl")
    log = MetricsLogger(cfg, tmp_path)
    log.log(1, {"pg_loss": 0.25, "reward/total": 0.5, "time/step": 2.0, "reward/format": 1.0, "grad_norm": float("nan")})
    log.log(2, {"pg_loss": 0.125, "reward/total": 0.75, "time/step": 1.5, "reward/format": 1.0})
    log.close()
    scalars = _tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars["actor/pg_loss"] == [(1, 0.25), (2, 0.125)]
    assert scalars["critic/score/mean"] == [(1, 0.5), (2, 0.75)] and scalars["timing_s/step"] == [(1, 2.0), (2, 1.5)]
    assert scalars["reward/format"] == [(1, 1.0), (2, 1.0)] and "actor/grad_norm" not in scalars
    assert [sorted(k for k in r if k not in ("step", "wall")) for r in read_metrics(tmp_path / "metrics.jsonl")][1] == \
        ["pg_loss", "reward/format", "reward/total", "time/step"]


def test_verl_names_are_a_renaming_without_collisions_of_different_values():
    from pebr_mega.logging import VERL_NAMES, external_names

    targets = {}
    for ours, theirs in VERL_NAMES.items():
        targets.setdefault(theirs, []).append(ours)
    assert {t: o for t, o in targets.items() if len(o) > 1} == {"actor/kl_loss": ["kl_loss", "kl"]}  # same value
    assert external_names({"loss": 1.0, "x/y": 2.0}, "pebr") == {"loss": 1.0, "x/y": 2.0}
    assert external_names({"loss": 1.0, "x/y": 2.0}, "verl") == {"actor/loss": 1.0, "x/y": 2.0}
