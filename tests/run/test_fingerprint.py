"""Run fingerprints (issue 12, item 5): a run directory or pipeline stage made with other settings is never
resumed or reused silently; `--force-restart` discards it; DONE files are atomic and carry the fingerprint."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pebr_mega.cli import build_parser
from pebr_mega.config import load_config
from pebr_mega.errors import SettingsMismatchError
from pebr_mega.run.run_dir import prepare_run_dir
from pebr_mega.run.fingerprint import FINGERPRINT, diff_settings, read_fingerprint, stage_settings
from pebr_mega.recipe.pipeline import _mark_done, check_recorded_stages
from pebr_mega.recipe.work_dir import STAGES, find_mismatch, stage_fingerprints, stage_result


def _cfg(tmp: Path, *extra: str):
    train = tmp / "train.json"
    if not train.exists():
        train.write_text('[{"qid": "a"}]')
    return load_config(None, [f"run.output_dir={tmp / 'run'}", f"grpo.train_file={train}", "grpo.stage=stage1",
                              *extra])


def test_settings_cover_what_is_trained_and_the_data_bytes_not_the_layout(tmp_path):
    base = stage_settings(_cfg(tmp_path), "grpo")
    assert "actor.lr" in base and "grpo.train_file#sha256" in base
    # Operational keys (where results go, how often they are saved, the device layout) are not recorded.
    assert stage_settings(_cfg(tmp_path, "grpo.save_every=7", "model.tp=2", "run.output_dir=/elsewhere"),
                          "grpo") == base
    assert diff_settings(base, stage_settings(_cfg(tmp_path, "actor.lr=3e-4"), "grpo")) == \
        [f"actor.lr {json.dumps(base['actor.lr'])} -> 0.0003"]
    (tmp_path / "train.json").write_text('[{"qid": "b"}]')  # same name, other content
    assert [d.split()[0] for d in diff_settings(base, stage_settings(_cfg(tmp_path), "grpo"))] == \
        ["grpo.train_file#sha256"]


def test_a_run_directory_with_other_settings_stops_unless_restarted(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_2").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    old = stage_settings(_cfg(tmp_path), "grpo")
    prepare_run_dir(run, "stage1", old)
    assert read_fingerprint(run / FINGERPRINT) == old
    prepare_run_dir(run, "stage1", old)  # same settings: resumes
    new = stage_settings(_cfg(tmp_path, "actor.lr=3e-4"), "grpo")
    with pytest.raises(SettingsMismatchError, match=r"holds a stage1 run made with other settings: actor\.lr .* "
                                                    r"-> 0\.0003; pass --force-restart"):
        prepare_run_dir(run, "stage1", new)
    assert (run / "checkpoints" / "step_2").is_dir()  # nothing was touched
    prepare_run_dir(run, "stage1", new, restart=True)
    assert sorted(p.name for p in run.iterdir()) == [FINGERPRINT] and read_fingerprint(run / FINGERPRINT) == new


def test_a_run_that_never_saved_is_recorded_anew(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    prepare_run_dir(run, "stage1", stage_settings(_cfg(tmp_path), "grpo"))
    new = stage_settings(_cfg(tmp_path, "actor.lr=3e-4"), "grpo")
    prepare_run_dir(run, "stage1", new)  # no checkpoint, result or model: nothing to protect
    assert read_fingerprint(run / FINGERPRINT) == new


def _pipeline_cfg(tmp: Path, *extra: str):
    for name in ("sft.json", "grpo.json"):
        if not (tmp / name).exists():
            (tmp / name).write_text("[]")
    return load_config(None, [f"pipeline.work_dir={tmp / 'work'}", f"pipeline.base_model={tmp / 'model'}",
                              f"pipeline.sft_file={tmp / 'sft.json'}", f"pipeline.grpo_file={tmp / 'grpo.json'}",
                              *extra])


def test_pipeline_stages_record_their_fingerprint_and_a_change_invalidates_the_later_ones(tmp_path):
    work = tmp_path / "work"
    plan = stage_fingerprints(_pipeline_cfg(tmp_path), work)
    for stage in STAGES:
        _mark_done(work, stage, {"stage": stage}, plan[stage])
    done = json.loads((work / "split" / "DONE").read_text())
    assert done["fingerprint"]["settings"] == plan["split"] and stage_result(work, "split") == {"stage": "split"}
    assert not list(work.rglob(".*.tmp"))  # written through a renamed temporary file
    check_recorded_stages(work, plan, restart=False, log=print)  # the same settings: every stage stays done

    changed = stage_fingerprints(_pipeline_cfg(tmp_path, "sample.n=3"), work)
    assert changed["sft"] == plan["sft"] and changed["stage2"] != plan["stage2"]  # the chain carries it on
    # The comparison alone (what `pebr pipeline --dry-run` reports) reads and discards nothing.
    found = find_mismatch(work, changed)
    assert (found.stage, found.why, found.redo) == ("sample", "sample.n 8 -> 3", STAGES[1:])
    assert found.folders() == [work / s for s in STAGES[1:]] + [work / "final"]
    assert find_mismatch(work, plan) is None and all((work / s / "DONE").is_file() for s in STAGES)
    with pytest.raises(SettingsMismatchError, match=r"stage sample was run with other settings: sample\.n 8 -> 3; "
                                                    r"pass --force-restart to redo sample, split, stage1, stage2"):
        check_recorded_stages(work, changed, restart=False, log=print)
    lines: list[str] = []
    check_recorded_stages(work, changed, restart=True, log=lines.append)
    assert [s for s in STAGES if (work / s / "DONE").is_file()] == ["sft"] and "discarding sample" in lines[0]


def test_force_restart_is_offered_by_the_commands_that_resume():
    parser = build_parser()
    for command in ("train", "sft", "pipeline"):
        assert parser.parse_args([command, "--force-restart"]).force_restart
    with pytest.raises(SystemExit):
        parser.parse_args(["sample", "--force-restart"])
