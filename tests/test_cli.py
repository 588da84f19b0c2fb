"""The `pebr` command: every subcommand answers --help, config errors are one line with exit status 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pebr_mega.cli import build_parser, main


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("name", _subcommands())
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: pebr " + name in capsys.readouterr().out


def test_module_entry_point_and_version():
    out = subprocess.run([sys.executable, "-m", "pebr_mega", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("pebr-mega ")


def test_config_errors_are_one_line_with_status_2(capsys):
    assert main(["train", "--dry-run", "grpo.rollout_batchsize=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "grpo.rollout_batchsize" in err and "rollout_batch_size" in err
    assert main(["sft", "--dry-run", "sft.epochs=two"]) == 2
    assert "sft.epochs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --dry-run
ROOT = Path(__file__).resolve().parents[1]
CONFIG_7B = str(ROOT / "launch" / "configs" / "qwen2_5_vl_7b.yaml")
# The presets, restated from upstream's reward functions (examples/reward_function/pebr_1.py, pebr_2.py).
STAGE1 = {"clip": 0.4, "keyword": 0.4, "format": 0.1, "length": 0.1, "accuracy": 0.0}
STAGE2 = {"clip": 0.0, "keyword": 0.0, "format": 0.1, "length": 0.0, "accuracy": 0.9}


def _grpo_file(tmp_path, sizes: list[tuple[int, int]], name: str = "grpo.json") -> Path:
    """GRPO records, record i showing an image of sizes[i] (one file per size)."""
    for h, w in set(sizes):
        Image.fromarray(np.full((h, w, 3), 127, dtype=np.uint8)).save(tmp_path / f"{h}x{w}.png")
    rows = [{"qid": f"q{i}", "problem": "<image>How many shapes?", "answer": "3", "images": [f"{h}x{w}.png"],
             "key_words": ["shape"]} for i, (h, w) in enumerate(sizes)]
    (tmp_path / name).write_text(json.dumps(rows))
    return tmp_path / name


def _model_dir(tmp_path) -> str:
    """A directory standing where the config expects a model: the dry run checks it exists and reads no weights
    (without a tokenizer in it, the prompt-length filter is named as not applied)."""
    (tmp_path / "model").mkdir(exist_ok=True)
    return str(tmp_path / "model")


def _dry(capsys, *argv: str) -> tuple[int, object, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if out.out.strip() else None), out.err


def test_train_dry_run_on_the_7b_config_counts_upstreams_steps(tmp_path, capsys):
    """Issue 13's check: the 7B config, stage 2, 1,100 prompts, batch 512, 2 epochs -> 2 full batches per epoch,
    4 steps, 76 prompts sitting out each epoch; the plan is JSON, nothing is loaded or written."""
    data = _grpo_file(tmp_path, [(56, 56)] * 1100)
    rc, plan, _ = _dry(capsys, "train", "--dry-run", "--world-size", "8", "--config", CONFIG_7B, "grpo.stage=stage2",
                       f"grpo.train_file={data}", f"data.image_root={tmp_path}", f"run.output_dir={tmp_path / 'run'}",
                       f"grpo.init_model={_model_dir(tmp_path)}")
    assert rc == 0
    assert list(plan)[:11] == ["stage", "prompts", "rollout_batch", "mini_batch", "epochs", "steps_per_epoch",
                               "total_steps", "updates_per_step", "samples_per_step", "reward_weights", "grading"]
    assert {k: plan[k] for k in list(plan)[:11]} == {
        "stage": "stage2", "prompts": 1100, "rollout_batch": 512, "mini_batch": 128, "epochs": 2,
        "steps_per_epoch": 2, "total_steps": 4, "updates_per_step": 4, "samples_per_step": 512 * 8,
        "reward_weights": STAGE2, "grading": "upstream"}
    assert plan["dropped_per_epoch"] == 76 and plan["records_read"] == 1100
    # The model directory holds no tokenizer: the prompt-length filter is named as not applied.
    assert any("max_prompt_length" in k and "grpo.init_model" in v for k, v in plan["filters_not_applied"].items())
    assert not (tmp_path / "run").exists()


def test_grpo_stage_alone_selects_the_reward_preset(tmp_path, capsys):
    """Issue 13, item 5: grpo.stage is the one switch (stage 2 used to train with stage-1 rewards unless
    rewards.stage said so too); the old key is refused, naming its replacement."""
    data = _grpo_file(tmp_path, [(56, 56)] * 8)
    common = [f"grpo.train_file={data}", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=4",
              f"grpo.init_model={_model_dir(tmp_path)}"]
    assert _dry(capsys, "train", "--dry-run", "grpo.stage=stage2", *common)[1]["reward_weights"] == STAGE2
    # Stage 1 needs the CLIP checkpoint: unset, the dry run stops as the run's start-up does, naming the key.
    rc, plan, err = _dry(capsys, "train", "--dry-run", "grpo.stage=stage1", *common)
    assert rc == 2 and plan is None and "rewards.clip_model_dir='' is not set" in err
    rc, plan, _ = _dry(capsys, "train", "--dry-run", "grpo.stage=stage1", *common, f"rewards.clip_model_dir={tmp_path}")
    assert rc == 0 and plan["reward_weights"] == STAGE1
    rc, _, err = _dry(capsys, "train", "--dry-run", "grpo.stage=stage2", "rewards.stage=stage1", *common)
    assert rc == 2 and "rewards.stage" in err and "grpo.stage alone selects the reward preset" in err


def test_train_dry_run_applies_the_prompt_length_filter_with_the_stage_tokenizer(tiny_model_dir, tmp_path, capsys):
    """With the stage's tokenizer at hand, over-long prompts are filtered before the steps are counted (upstream
    filters its dataset before batching): 224 x 224 images give 64 image tokens, 56 x 56 ones 4, and the
    prompt limit falls between the two prompt lengths."""
    from transformers import AutoTokenizer

    from pebr_mega.data.images import ImageConfig
    from pebr_mega.data.pil_backend import PilImageDecoder
    from pebr_mega.data.records import GRPORecord
    from pebr_mega.rollout.requests import RequestBuilder

    data = _grpo_file(tmp_path, [(56, 56)] * 9 + [(224, 224)] * 5 + [(10, 300)])
    builder = RequestBuilder(AutoTokenizer.from_pretrained(tiny_model_dir),
                             PilImageDecoder(ImageConfig(min_pixels=3136, max_pixels=50176)))
    short, long_ = (len(builder.build_one(GRPORecord("x", "<image>How many shapes?", "3", [f]), tmp_path).prompt_ids)
                    for f in ("56x56.png", "224x224.png"))
    assert long_ - short == 60
    rc, plan, _ = _dry(capsys, "train", "--dry-run", "grpo.stage=stage2", f"grpo.train_file={data}",
                       f"grpo.init_model={tiny_model_dir}", "images.min_pixels=3136", "images.max_pixels=50176",
                       f"data.max_prompt_length={short + 10}", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=2")
    # The 10 x 300 image is scaled up to one merged patch high (as upstream's processor does), not skipped.
    assert rc == 0 and plan["prompts"] == 10 and plan["records_read"] == 15
    assert plan["skipped"] == {"prompt_too_long": 5}
    assert (plan["steps_per_epoch"], plan["total_steps"], plan["updates_per_step"]) == (2, 4, 2)
    assert not plan["filters_not_applied"]


def test_train_dry_run_holdout_and_what_cannot_start(tmp_path, capsys):
    data = _grpo_file(tmp_path, [(56, 56)] * 10)
    common = ["grpo.stage=stage2", f"grpo.train_file={data}", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=4",
              f"grpo.init_model={_model_dir(tmp_path)}"]
    rc, plan, _ = _dry(capsys, "train", "--dry-run", *common, "grpo.eval_holdout=3")
    assert rc == 0 and (plan["prompts"], plan["steps_per_epoch"], plan["dropped_per_epoch"]) == (7, 1, 3)
    assert plan["eval"]["source"] == "grpo.eval_holdout" and plan["eval"]["records"] == 3
    rc, _, err = _dry(capsys, "train", "--dry-run", *common, "grpo.eval_holdout=3", f"data.eval_file={data}")
    assert rc == 2 and "grpo.eval_holdout=3" in err and "data.eval_file" in err
    rc, plan, err = _dry(capsys, "train", "--dry-run", *common, "grpo.eval_holdout=7")
    assert rc == 2 and plan["total_steps"] == 0 and "3 usable prompts" in err and "grpo.rollout_batch_size=4" in err
    rc, _, err = _dry(capsys, "train", "--dry-run", *common, "grpo.eval_holdout=10")
    assert rc == 2 and "nothing left to train on" in err


def _last_error(capsys, argv: list[str]) -> tuple[int, str]:
    """Run `pebr` for real; its exit status and last stderr line."""
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()[-1]


def _tree(path: Path) -> list[str]:
    """Every path below `path`, but the lock file a real run takes (`.pebr-lock`: held while it runs)."""
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.name != ".pebr-lock")


def test_train_dry_run_reports_the_run_directory_as_the_run_finds_it(tiny_model_dir, tmp_path, capsys):
    """`run_dir` of `pebr train --dry-run` is what the run's start-up does with run.output_dir: a run directory
    written by the run's own functions (claim, fingerprint, a committed checkpoint) is resumed from its step;
    with another lr the real `pebr train` stops before loading a model, and the dry run ends with the same line
    and status; with --force-restart it lists what the run discards (the run's own restart, applied to a copy,
    removes exactly that); a directory pebr did not create is refused with the run's error. The dry run itself
    writes nothing."""
    import shutil

    from pebr_mega.config import load_config
    from pebr_mega.outputs import claim_output_dir
    from pebr_mega.run.stage_checkpoints import CheckpointManager
    from pebr_mega.run.run_dir import RUN_FILES, RunSpec, prepare_run_dir

    data = _grpo_file(tmp_path, [(56, 56)] * 8)
    run = tmp_path / "run"
    common = ["grpo.stage=stage2", f"grpo.train_file={data}", f"grpo.init_model={tiny_model_dir}",
              "images.min_pixels=3136", "images.max_pixels=50176", "grpo.rollout_batch_size=4",
              "grpo.mini_batch_size=4"]
    overrides = [*common, f"run.output_dir={run}"]
    rc, plan, _ = _dry(capsys, "train", "--dry-run", *overrides)
    assert rc == 0 and plan["run_dir"] == {"path": str(run), "status": "new"} and not run.exists()

    spec = RunSpec.grpo(load_config(None, overrides))
    claim_output_dir(run, [spec.init_model, *spec.inputs], what="run.output_dir", writes=RUN_FILES)
    prepare_run_dir(run, spec.stage, spec.settings)
    CheckpointManager(run / "checkpoints").save(3, lambda d: (d / "trainer_state.pt").write_bytes(b"state"))
    before = _tree(run)
    rc, plan, _ = _dry(capsys, "train", "--dry-run", *overrides)
    assert rc == 0 and plan["run_dir"]["status"] == "resume" and plan["run_dir"]["checkpoint_step"] == 3

    rc_real, real = _last_error(capsys, ["train", *overrides, "actor.lr=3e-4"])
    assert rc_real == 2 and real.startswith(f"pebr train: error: run.output_dir {run} holds a stage2 run made with "
                                            "other settings: actor.lr "), real
    assert real.endswith("-> 0.0003; pass --force-restart to discard it, or choose a new run.output_dir")
    rc, plan, err = _dry(capsys, "train", "--dry-run", *overrides, "actor.lr=3e-4")
    assert rc == 2 and err.strip().splitlines()[-1] == real
    assert plan["run_dir"]["status"] == "settings differ" and plan["run_dir"]["error"] == \
        real.removeprefix("pebr train: error: ")
    assert [d.split()[0] for d in plan["run_dir"]["differences"]] == ["actor.lr"] and plan["total_steps"] == 4

    rc, plan, _ = _dry(capsys, "train", "--dry-run", "--force-restart", *overrides, "actor.lr=3e-4")
    assert rc == 0 and plan["run_dir"]["status"] == "restart"
    assert plan["run_dir"]["discards"] == ["fingerprint.json", "checkpoints"]
    assert _tree(run) == before  # no dry run touched the directory
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    prepare_run_dir(copy, spec.stage, spec.settings, restart=True)  # the run's own restart
    assert sorted({f.split("/")[0] for f in before} - {f.split("/")[0] for f in _tree(copy)}) == ["checkpoints"]
    # (fingerprint.json is discarded, then recorded anew)

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("not pebr's")
    rc_real, real = _last_error(capsys, ["train", *common, f"run.output_dir={user}"])
    assert rc_real == 2 and "was not created by pebr" in real
    rc, plan, err = _dry(capsys, "train", "--dry-run", *common, f"run.output_dir={user}")
    assert rc == 2 and err.strip().splitlines()[-1] == real and plan["run_dir"]["status"] == "refused"
    assert plan["run_dir"]["error"] == real.removeprefix("pebr train: error: ")
    # An output directory inside the starting model's directory (an input) is refused the same way.
    rc, plan, err = _dry(capsys, "train", "--dry-run", *common, f"run.output_dir={tiny_model_dir / 'run'}")
    assert rc == 2 and plan["run_dir"]["status"] == "refused" and "lies inside the input" in err


def test_sft_dry_run_stops_as_the_sft_run_does_on_other_settings(tiny_model_dir, tmp_path, capsys):
    """The same check for `pebr sft`: a run recorded with sft.lr 1e-5 and a checkpoint; another sft.lr stops
    the real run and the dry run with one identical line and status 2; the same settings resume."""
    from pebr_mega.config import load_config
    from pebr_mega.outputs import claim_output_dir
    from pebr_mega.run.stage_checkpoints import CheckpointManager
    from pebr_mega.run.run_dir import RunSpec, prepare_run_dir

    _grpo_file(tmp_path, [(56, 56)])
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>What is it?"},
                                             {"role": "assistant", "content": "A square."}], "images": ["56x56.png"]}] * 3))
    run = tmp_path / "run"
    overrides = [f"sft.train_file={sft}", f"sft.init_model={tiny_model_dir}", "sft.batch_size=2",
                 f"run.output_dir={run}"]
    spec = RunSpec.sft(load_config(None, overrides))
    claim_output_dir(run)
    prepare_run_dir(run, spec.stage, spec.settings)
    CheckpointManager(run / "checkpoints").save(1, lambda d: (d / "trainer_state.pt").write_bytes(b"state"))
    rc, plan, _ = _dry(capsys, "sft", "--dry-run", *overrides)
    assert rc == 0 and (plan["run_dir"]["status"], plan["run_dir"]["checkpoint_step"]) == ("resume", 1)
    rc_real, real = _last_error(capsys, ["sft", *overrides, "sft.lr=2e-5"])
    assert rc_real == 2 and "holds a sft run made with other settings: sft.lr 1e-05 -> 2e-05" in real, real
    rc, plan, err = _dry(capsys, "sft", "--dry-run", *overrides, "sft.lr=2e-5")
    assert rc == 2 and err.strip().splitlines()[-1] == real and plan["run_dir"]["differences"] == ["sft.lr 1e-05 -> 2e-05"]


def _pipeline_overrides(tmp_path, model) -> list[str]:
    """A tiny pipeline: 5 usable SFT conversations (and one odd), 12 GRPO questions, batches of 4."""
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>What is it?"},
                                             {"role": "assistant", "content": "A square."}], "images": ["56x56.png"]}] * 5
                              + [{"messages": [{"role": "user", "content": "odd"}]}]))
    grpo = _grpo_file(tmp_path, [(56, 56)] * 12)
    return [f"pipeline.work_dir={tmp_path / 'work'}", f"pipeline.base_model={model}", f"pipeline.sft_file={sft}",
            f"pipeline.grpo_file={grpo}", "images.min_pixels=3136", "images.max_pixels=50176", "sample.max_pixels=50176",
            "sft.batch_size=2", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=4",
            f"rewards.clip_model_dir={_model_dir(tmp_path)}"]  # stage 1's CLIP: only its existence is checked here


def test_pipeline_dry_run_plans_each_stage_and_names_pending_inputs(tiny_model_dir, tmp_path, capsys):
    argv = ["pipeline", "--dry-run", *_pipeline_overrides(tmp_path, tiny_model_dir)]
    grpo, work = tmp_path / "grpo.json", tmp_path / "work"
    rc, plans, _ = _dry(capsys, *argv)
    by = {p["stage"]: p for p in plans}
    assert rc == 0 and list(by) == ["sft", "sample", "split", "stage1", "stage2", "export"]
    assert (by["sft"]["prompts"], by["sft"]["steps_per_epoch"], by["sft"]["total_steps"]) == (5, 3, 6)
    assert by["sft"]["skipped"] == {"odd_turns": 1} and by["sft"]["last_batch"] == 1
    assert by["sample"]["prompts"] == 12 and "does not exist" in str(by["sample"]["filters_not_applied"])
    assert by["split"]["status"] == by["stage1"]["status"] == by["stage2"]["status"] == "pending input"
    assert by["stage1"]["prompts"] is None and "easycase.json" in by["stage1"]["note"]
    assert by["stage1"]["reward_weights"] == STAGE1 and by["stage2"]["reward_weights"] == STAGE2
    assert by["stage2"]["rollout_batch"] == 4 and by["stage2"]["epochs"] == 2
    # Once the earlier stages have run: sft done, the split done and written (3 easy questions: fewer than a batch).
    # (A split still to run rewrites its files after sampling: the GRPO stages' inputs are then pending.)
    (work / "sft").mkdir(parents=True)
    (work / "sft" / "DONE").write_text(json.dumps({"model_dir": str(tiny_model_dir)}))
    (work / "split").mkdir()
    rows = json.loads(grpo.read_text())
    (work / "split" / "easycase.json").write_text(json.dumps(rows[:3]))
    (work / "split" / "mediumcase.json").write_text(json.dumps(rows[3:]))
    (work / "split" / "DONE").write_text(json.dumps({"dir": str(work / "split")}))
    rc, plans, _ = _dry(capsys, *argv)
    by = {p["stage"]: p for p in plans}
    assert rc == 0 and by["sft"]["status"] == "done"
    assert not by["sample"]["filters_not_applied"]  # the SFT model (here the tiny one) has a tokenizer
    assert by["stage1"]["status"] == "skipped" and "fewer than one rollout batch" in by["stage1"]["note"]
    s2 = by["stage2"]
    assert s2["status"] == "to run" and s2["init_model"] == str(tiny_model_dir)  # stage 1 passes the SFT model on
    assert (s2["prompts"], s2["steps_per_epoch"], s2["total_steps"], s2["dropped_per_epoch"]) == (9, 2, 4, 1)
    assert not (work / "stage2").exists()


def test_pipeline_split_without_rollouts_stops_the_dry_run_and_the_run_alike(tiny_model_dir, tmp_path, capsys):
    """The split stage run alone, with no sampling done: both stop at the split, with the same line."""
    argv = [*_pipeline_overrides(tmp_path, tiny_model_dir), "pipeline.stages=[split]"]
    rc, plans, err = _dry(capsys, "pipeline", "--dry-run", *argv)
    rollouts = tmp_path / "work" / "sample" / "rollouts.jsonl"
    assert rc == 2 and plans[0]["status"] == "to run" and plans[0]["error"] == \
        f"{rollouts} does not exist: the sample stage writes it"
    real_rc, real = _last_error(capsys, ["pipeline", *argv])
    assert real_rc == 2 and real == err.strip().splitlines()[-1]
    assert not (tmp_path / "work" / "split").exists()


def test_pipeline_dry_run_checks_the_recorded_fingerprints_as_the_run_does(tiny_model_dir, tmp_path, capsys):
    """A work directory whose sft, sample and split are done and whose stage 1 was interrupted, each recorded
    with its fingerprint (`pipeline._mark_done` / `_mark_started`, as the run writes them). The dry run reports
    what the run does: done stages stay done; with another `sample.n` the run stops before anything runs with
    the same error (the real run is started to compare), or with --force-restart sample and every later stage
    are planned as the run finds them after discarding their folders. The dry run itself touches nothing."""
    from pebr_mega.config import load_config
    from pebr_mega.outputs import claim_output_dir
    from pebr_mega.recipe import pipeline as pl
    from pebr_mega.recipe.work_dir import stage_result

    overrides = _pipeline_overrides(tmp_path, tiny_model_dir)
    work = tmp_path / "work"
    claim_output_dir(work)  # as the run claims it
    recorded = pl.stage_fingerprints(load_config(None, overrides), work)
    pl._mark_done(work, "sft", {"model_dir": str(tiny_model_dir)}, recorded["sft"])
    (work / "sample" / "rollouts.jsonl").parent.mkdir()
    (work / "sample" / "rollouts.jsonl").write_text('{"qid": "q0", "score": 1.0}\n')
    pl._mark_done(work, "sample", {"output": str(work / "sample" / "rollouts.jsonl")}, recorded["sample"])
    rows = json.loads((tmp_path / "grpo.json").read_text())
    (work / "split").mkdir()
    (work / "split" / "easycase.json").write_text(json.dumps(rows[:4]))
    (work / "split" / "mediumcase.json").write_text(json.dumps(rows[4:]))
    pl._mark_done(work, "split", {"dir": str(work / "split")}, recorded["split"])
    pl._mark_started(work, "stage1", recorded["stage1"])
    before = _tree(work)

    # The same settings: the finished stages are done, the interrupted one and the rest run.
    rc, plans, _ = _dry(capsys, "pipeline", "--dry-run", *overrides)
    status = {p["stage"]: p["status"] for p in plans}
    assert rc == 0 and status == {"sft": "done", "sample": "done", "split": "done", "stage1": "to run",
                                  "stage2": "to run", "export": "to run"}
    assert plans[3]["prompts"] == 4 and plans[3]["init_model"] == str(tiny_model_dir)
    # what stage 1's trainer finds in its folder, as `pebr train --dry-run` reports it (no checkpoint yet: new)
    assert plans[3]["run_dir"] == {"path": str(work / "stage1"), "status": "new"}

    # Another sample.n: the real run stops at start-up with one line naming the key ...
    assert main(["pipeline", *overrides, "sample.n=3"]) == 2
    real = capsys.readouterr().err.strip().splitlines()[-1]
    assert real.startswith("pebr pipeline: error: ") and "stage sample was run with other settings: sample.n 8 -> 3; " \
        "pass --force-restart to redo sample, split, stage1, stage2, export" in real, real
    # ... and the dry run reports that stop, with the same message, and exits with the same status.
    rc, plans, err = _dry(capsys, "pipeline", "--dry-run", *overrides, "sample.n=3")
    by = {p["stage"]: p for p in plans}
    assert rc == 2 and real.removeprefix("pebr pipeline: error: ") in err.strip().splitlines()[-1]
    assert {s: p["status"] for s, p in by.items()} == {"sft": "done", "sample": "settings differ", "split": "stopped",
                                                     "stage1": "stopped", "stage2": "stopped", "export": "stopped"}
    assert by["sample"]["differences"] == "sample.n 8 -> 3" and "prompts" not in by["split"]
    # A recorded stage outside pipeline.stages stops the run as well, and is named.
    rc, plans, err = _dry(capsys, "pipeline", "--dry-run", *overrides, "sample.n=3", "pipeline.stages=[stage2,export]")
    assert rc == 2 and [(p["stage"], p["status"]) for p in plans] == \
        [("sample", "settings differ"), ("stage2", "stopped"), ("export", "stopped")]

    # With --force-restart: sample is redone, and the split and GRPO inputs it would discard count as absent.
    rc, plans, _ = _dry(capsys, "pipeline", "--dry-run", "--force-restart", *overrides, "sample.n=3")
    by = {p["stage"]: p for p in plans}
    assert rc == 0 and {s: p["status"] for s, p in by.items()} == {
        "sft": "done", "sample": "to run", "split": "pending input", "stage1": "pending input",
        "stage2": "pending input", "export": "to run"}
    assert by["sample"]["restart"] == "sample was run with other settings (sample.n 8 -> 3): discarding sample, " \
                                      "split, stage1, stage2, export"
    assert by["sample"]["n"] == 3 and by["stage1"]["prompts"] is None and "restart" not in by["split"]
    # Outside pipeline.stages, the discarded stage is named and the stages after it start from what is left: no
    # split runs, so stage 1 finds no easy set and is skipped, passing the SFT model on.
    restart_sft_stage1 = ["--force-restart", *overrides, "sample.n=3", "pipeline.stages=[sft,stage1]"]
    rc, plans, _ = _dry(capsys, "pipeline", "--dry-run", *restart_sft_stage1)
    assert rc == 0 and [(p["stage"], p["status"]) for p in plans] == \
        [("sft", "done"), ("sample", "discarded"), ("stage1", "skipped")]
    assert plans[2]["init_model"] == str(tiny_model_dir)
    assert plans[2]["note"].startswith(f"0 questions in {work / 'split' / 'easycase.json'}")
    assert _tree(work) == before  # the dry runs wrote nothing
    # The run does what its dry run said (no model is loaded: sft is done, stage 1 skipped).
    assert main(["pipeline", *restart_sft_stage1]) == 0
    capsys.readouterr()
    recorded = stage_result(work, "stage1")
    assert recorded == {"model_dir": str(tiny_model_dir), "skipped": plans[2]["note"].split(": the stage passes")[0],
                        "seconds": recorded["seconds"]}


def test_training_commands_fail_at_start_up_with_one_line(tmp_path, capsys):
    assert main(["train", f"run.output_dir={tmp_path}", f"grpo.init_model={tmp_path / 'nope'}"]) == 2
    assert f"grpo.init_model='{tmp_path / 'nope'}' directory does not exist" in capsys.readouterr().err
    assert main(["sft", f"run.output_dir={tmp_path}", "model.tp=0"]) == 2
    assert "config key 'model.tp' = 0" in capsys.readouterr().err


def test_dry_run_runs_the_start_up_checks_of_the_run(tiny_model_dir, tmp_path, capsys):
    """Issue 24, item 4: what the real start-up refuses, the dry run refuses too (one shared check), naming the
    key: a layout the world cannot hold, a misspelt CLIP directory, no config at all, a split file not written
    yet; `--world-size` gives the dry run the launcher's world."""
    data = _grpo_file(tmp_path, [(56, 56)] * 8)
    common = ["grpo.stage=stage2", f"grpo.train_file={data}", f"grpo.init_model={tiny_model_dir}",
              "grpo.rollout_batch_size=4", "grpo.mini_batch_size=4"]
    rc, plan, err = _dry(capsys, "train", "--dry-run", "--world-size", "1", *common, "model.tp=3")  # one GPU
    assert rc == 2 and plan is None and "model.tp=3" in err and "world size 1" in err and "(--world-size)" in err
    # No GPU here and no --world-size: the layout's own world (3), where the tiny model's heads still refuse tp=3.
    rc, plan, err = _dry(capsys, "train", "--dry-run", *common, "model.tp=3")
    assert rc == 2 and plan is None and "model.tp=3 does not divide the model's" in err
    real_rc, real = _last_error(capsys, ["train", *common, "model.tp=3", f"run.output_dir={tmp_path / 'run'}"])
    assert real_rc == 2 and "model.tp=3" in real  # the real run, with the same check
    rc, _, err = _dry(capsys, "train", "--dry-run", "--world-size", "2", *common, "model.tp=2", "model.pp=1")
    assert "model.tp=2 x model.pp=1" not in err and "world size" not in err  # 2 ranks hold tp=2
    assert rc == 0  # the plan came out
    rc, _, err = _dry(capsys, "train", "--dry-run", *common, "grpo.stage=stage1",
                      f"rewards.clip_model_dir={tmp_path / 'FG-CLIP-lrage'}")
    assert rc == 2 and f"rewards.clip_model_dir='{tmp_path / 'FG-CLIP-lrage'}' directory does not exist" in err
    rc, _, err = _dry(capsys, "train", "--dry-run")
    assert rc == 2 and "grpo.init_model='' is not set" in err and "grpo.train_file='' is not set" in err
    rc, _, err = _dry(capsys, "train", "--dry-run", *common, f"grpo.train_file={tmp_path / 'split/mediumcase.json'}")
    assert rc == 2 and "grpo.train_file=" in err and "run `pebr sample` and `pebr split` first" in err


def test_dry_run_on_one_gpu_refuses_tp_3_as_the_run_does(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Issue 25: `pebr train --dry-run model.tp=3` on a machine with one GPU exits non-zero naming the tensor-parallel
    check, and the real run refuses with the same message: both list the failures of one function
    (`plan.startup_checks`) on the world each would have."""
    import torch

    from pebr_mega.config import load_config
    from pebr_mega.plan.startup import World, startup_checks

    data = _grpo_file(tmp_path, [(56, 56)] * 8)
    common = ["grpo.stage=stage2", f"grpo.train_file={data}", f"grpo.init_model={tiny_model_dir}",
              "grpo.rollout_batch_size=4", "grpo.mini_batch_size=4", "model.tp=3", "rollout.engine=hf"]
    cfg = load_config(None, common)
    with monkeypatch.context() as one_gpu:  # one GPU visible and no launcher: both worlds are one process
        one_gpu.setattr(torch.cuda, "is_available", lambda: True)
        one_gpu.setattr(torch.cuda, "device_count", lambda: 1)
        dry, real = World.for_dry_run(cfg), World.of_launcher()
    assert (dry.size, dry.devices, real.size, real.devices) == (1, 1, 1, 1)
    failures = startup_checks(cfg, "train", dry).errors
    assert failures == startup_checks(cfg, "train", real).errors
    assert "model.tp=3 x model.pp=1 = 3 GPUs per model replica does not divide the world size 1" in failures[0]
    # Through the CLI on the launcher's one-process world: the dry run and the run end with the same lines.
    monkeypatch.setenv("WORLD_SIZE", "1")
    rc, plan, err = _dry(capsys, "train", "--dry-run", *common)
    real_rc = main(["train", *common, f"run.output_dir={tmp_path / 'run'}"])
    real_err = capsys.readouterr().err
    assert rc == real_rc == 2 and plan is None and not (tmp_path / "run").exists()
    assert "does not divide the world size 1" in err and "(WORLD_SIZE from the launcher)" in err
    assert err.replace("pebr train: error: ", "") == real_err.replace("pebr train: error: ", "")


def test_start_up_refuses_more_processes_per_node_than_gpus():
    """One GPU per process (`parallel.groups.init_distributed` binds LOCAL_RANK's GPU): a node starting 3 processes
    on 1 visible GPU is refused at start-up, by the run and the dry run alike; a CPU run has no such rule."""
    from pebr_mega.config import load_config
    from pebr_mega.plan.startup import World, startup_checks

    cfg = load_config(None, ["model.tp=1", "grpo.init_model=/nowhere", "rollout.engine=hf"])
    over = startup_checks(cfg, "train", World(3, gpus_per_node=3, devices=1), inputs=False)
    assert over.errors == ["3 processes per node (LOCAL_WORLD_SIZE) but 1 GPU(s) visible here: each process drives "
                           "its own GPU; start at most 1 per node"]
    assert startup_checks(cfg, "train", World(3, gpus_per_node=3, devices=0), inputs=False).ok
    assert startup_checks(cfg, "train", World(3, gpus_per_node=3, devices=4), inputs=False).ok


def test_plan_exits_non_zero_naming_the_failing_check_of_the_configured_layout(capsys):
    assert main(["plan", "--config", CONFIG_7B, "model.tp=3"]) == 2
    out = capsys.readouterr()
    assert "the configured layout cannot start on this cluster" in out.out
    assert "model.tp=3 must divide the 8 GPUs per node" in out.out and "model.tp=3" in out.err
    assert main(["plan", "--config", CONFIG_7B]) == 0


def test_sft_dry_run_counts_unreadable_images_and_reads_them_from_sft_image_root(tiny_model_dir, tmp_path, capsys):
    """Issue 24, item 3: SFT images resolve against sft.image_root (else the SFT file's folder), never the GRPO
    images' data.image_root; a dry run in which every image is unreadable counts them and exits non-zero."""
    images = tmp_path / "sft_images"
    images.mkdir()
    Image.fromarray(np.full((56, 56, 3), 9, dtype=np.uint8)).save(images / "a.png")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [{"messages": [{"role": "user", "content": "<image>What is it?"},
                          {"role": "assistant", "content": "A square."}], "images": [name]}
            for name in ("a.png", "broken.png", "missing.png")]
    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps(rows))
    common = ["sft", "--dry-run", f"sft.init_model={tiny_model_dir}", f"sft.train_file={sft}",
              f"run.output_dir={tmp_path / 'run'}", "sft.batch_size=1", f"data.image_root={tmp_path / 'grpo_images'}"]
    (tmp_path / "grpo_images").mkdir()
    rc, plan, _ = _dry(capsys, *common, f"sft.image_root={images}")
    assert rc == 0 and plan["prompts"] == 1 and plan["skipped"] == {"image": 2} and plan["image_root"] == str(images)
    rc, plan, err = _dry(capsys, *common)  # the SFT file's folder holds none of them
    assert rc == 2 and plan["prompts"] == 0 and plan["skipped"] == {"image": 3} and "no usable SFT" in err


def test_sft_weight_decay_is_upstreams_zero_and_its_own_key():
    """Issue 24, item 7: LLaMA-Factory's HF Trainer SFT has weight decay 0.0; the GRPO stages keep actor's 1e-2."""
    from pebr_mega.config import load_config
    from pebr_mega.trainer.sft import sft_actor_config

    cfg = load_config(CONFIG_7B)
    assert cfg.actor.weight_decay == 1e-2 and sft_actor_config(cfg.actor, cfg.sft).weight_decay == 0.0
    cfg = load_config(CONFIG_7B, ["sft.weight_decay=0.05"])
    assert sft_actor_config(cfg.actor, cfg.sft).weight_decay == 0.05
