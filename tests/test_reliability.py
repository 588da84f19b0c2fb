"""Issue 12, reproduced where the user meets it (the `pebr` command): outputs that would destroy inputs, and
the inputs that used to end in a raw traceback. Each case exits with status 2 and one line naming the path or
key, and leaves the inputs as they were.

Other cases of the issue live with their component: the export/convert tools (test_checkpoint.py), config
values (test_config.py), the reward time limit (test_reward_guard.py), checkpoint verification
(test_checkpointing.py), orphaned child processes (test_lifetime.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from pebr_mega.cli import main


def _err_line(capsys) -> str:
    """The error: one line, the last on stderr (start-up notes of `pebr_mega.plan` may come before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert ": error: " in last and all(": note: " in line for line in err.splitlines()[:-1]), err
    return last


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny synthetic GRPO set (grpo.json, eval.json, images/), written by `pebr synth`."""
    out = tmp_path_factory.mktemp("data") / "synth"
    assert main(["synth", "--out", str(out), "--num", "4", "--num-sft", "2", "--num-eval", "2"]) == 0
    return out


# -------------------------------------------------------------------------- item 2: outputs vs inputs
def test_filter_sft_output_equal_to_input_or_its_sidecar(tmp_path, capsys):
    data = tmp_path / "sft.json"
    data.write_text(json.dumps([{"messages": [], "images": []}]))
    (tmp_path / "images").mkdir()
    before = data.read_text()
    assert main(["filter-sft", "--input", str(data), "--output", str(data), "--image-root", str(tmp_path / "images")]) == 2
    assert f"--output {data} is also an input" in _err_line(capsys)
    # The sidecar of --output x.json is x.dropped.json: here, the input.
    side = tmp_path / "x.dropped.json"
    side.write_text(before)
    assert main(["filter-sft", "--input", str(side), "--output", str(tmp_path / "x.json"),
                 "--image-root", str(tmp_path / "images")]) == 2
    assert "the dropped-records file" in _err_line(capsys)
    assert data.read_text() == before and side.read_text() == before and not (tmp_path / "x.json").exists()
    # --output that is a directory
    assert main(["filter-sft", "--input", str(data), "--output", str(tmp_path), "--image-root", str(tmp_path / "images")]) == 2
    assert "is a directory" in _err_line(capsys)


def test_eval_results_over_the_dataset(dataset, tiny_model_dir, capsys):
    grpo = dataset / "grpo.json"
    before = grpo.read_text()
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(grpo), "--results", str(grpo)]) == 2
    assert "--results" in _err_line(capsys) and grpo.read_text() == before


def test_sample_output_equal_to_the_dataset(dataset, tiny_model_dir, tmp_path, capsys):
    grpo = tmp_path / "grpo.json"
    shutil.copy(dataset / "grpo.json", grpo)
    before = grpo.read_text()
    assert main(["sample", f"sample.model={tiny_model_dir}", f"sample.dataset={grpo}", f"sample.output={grpo}"]) == 2
    assert f"sample.output {grpo} is also an input" in _err_line(capsys) and grpo.read_text() == before


def test_synth_over_a_directory_holding_user_files(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "grpo.json").write_text("[\"my records\"]")
    assert main(["synth", "--out", str(user), "--num", "2", "--num-eval", "1"]) == 2
    assert "was not created by pebr" in _err_line(capsys)
    assert (user / "grpo.json").read_text() == "[\"my records\"]" and not (user / "images").exists()
    # pebr's own output directory may be written again
    out = tmp_path / "synth"
    for _ in range(2):
        assert main(["synth", "--out", str(out), "--num", "2", "--num-sft", "1", "--num-eval", "1"]) == 0
    capsys.readouterr()


def test_split_out_dir_holding_its_dataset(dataset, tmp_path, capsys):
    split = tmp_path / "split"
    split.mkdir()
    grpo = split / "easycase.json"
    shutil.copy(dataset / "grpo.json", grpo)
    (tmp_path / "rollouts.jsonl").write_text("")
    before = grpo.read_text()
    assert main(["split", "--rollouts", str(tmp_path / "rollouts.jsonl"), "--dataset", str(grpo),
                 "--out-dir", str(split)]) == 2
    assert "would be overwritten" in _err_line(capsys) and grpo.read_text() == before


def test_training_into_its_own_init_model_or_a_user_directory(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    data = model / "data.json"  # inputs that exist, so that the start-up reaches the output checks
    data.write_text("[]")
    assert main(["train", "grpo.stage=stage2", f"grpo.init_model={model}", f"grpo.train_file={data}",
                 f"run.output_dir={model}"]) == 2
    assert "is or lies inside the input" in _err_line(capsys)
    assert main(["sft", f"sft.init_model={model}", f"sft.train_file={data}", f"run.output_dir={tmp_path}"]) == 2
    assert "was not created by pebr" in _err_line(capsys)  # tmp_path holds other files
    assert main(["pipeline", f"pipeline.work_dir={tmp_path}", f"pipeline.base_model={model}",
                 f"pipeline.sft_file={data}", f"pipeline.grpo_file={data}", f"rewards.clip_model_dir={model}"]) == 2
    assert "pipeline.work_dir" in _err_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_tiny_model_over_a_user_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["tiny-model", "--out", str(tmp_path)]) == 2
    assert "was not created by pebr" in _err_line(capsys) and (tmp_path / "keep.txt").read_text() == "x"


# -------------------------------------------------------------------------- item 9: one-line errors
def _broken_model(tiny_model_dir, tmp_path, how: str) -> Path:
    model = tmp_path / f"model_{how}"
    shutil.copytree(tiny_model_dir, model)
    if how == "config":
        (model / "config.json").write_text('{"model_type": "qwen2_5_vl",')
    elif how == "truncated":
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "garbage":
        (model / "model.safetensors").write_bytes(b"\x00\xffnot a safetensors file" * 100)
    return model


@pytest.mark.parametrize("how,message", [
    ("config", r"config.json is not valid JSON \(line 1"),
    ("truncated", r"model.safetensors: cannot open safetensors file"),
    ("garbage", r"model.safetensors: cannot open safetensors file"),
])
def test_broken_model_directories_are_one_line_errors(how, message, dataset, tiny_model_dir, tmp_path, capsys):
    import re

    model = _broken_model(tiny_model_dir, tmp_path, how)
    assert main(["eval", "--model", str(model), "--dataset", str(dataset / "eval.json")]) == 2
    assert re.search(message, _err_line(capsys))
    assert main(["sample", f"sample.model={model}", f"sample.dataset={dataset / 'grpo.json'}",
                 f"sample.output={tmp_path / 'r.jsonl'}"]) == 2
    assert re.search(message, _err_line(capsys))
    assert main(["infer", "--model", str(model), "--image", "x.png", "--question", "q"]) == 2
    assert re.search(message, _err_line(capsys))


def test_missing_model_says_the_directory_does_not_exist(dataset, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert main(["eval", "--model", str(missing), "--dataset", str(dataset / "eval.json")]) == 2
    err = _err_line(capsys)
    assert f"{missing}: directory does not exist" in err and "huggingface" not in err.lower()
    assert main(["train", "grpo.stage=stage2", f"grpo.init_model={missing}", f"grpo.train_file={dataset / 'eval.json'}",
                 f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert f"grpo.init_model='{missing}' directory does not exist" in _err_line(capsys)


@pytest.mark.parametrize("content", ["", "[]", '{"qid": "1"}', '{\n  "not": "a list"\n}'])
def test_eval_on_an_empty_or_non_list_dataset_is_an_error(content, tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(content)
    assert main(["eval", "--model", str(tiny_model_dir), "--dataset", str(data)]) == 2
    assert str(data) in _err_line(capsys)
    assert "accuracy" not in capsys.readouterr().out


def test_yaml_that_is_not_a_mapping_through_the_cli(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("- rollout\n- n\n")
    assert main(["train", "--config", str(f)]) == 2
    assert "must hold a mapping of sections" in _err_line(capsys)


def test_plot_rows_without_step_and_out_as_a_directory(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"reward/total": 0.5}\n{"reward/total": 0.7}\n')
    assert main(["plot", str(run)]) == 2
    assert "no numeric 'step'" in _err_line(capsys)
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/total": 0.5}\n{"step": 2, "reward/total": 0.7}\n')
    plots = tmp_path / "plots"
    plots.mkdir()
    assert main(["plot", str(run), "--out", str(plots)]) == 0
    assert (plots / "curves.png").stat().st_size > 0
    assert main(["plot", str(run), "--out", str(run / "metrics.jsonl")]) == 2  # the plot over its own input
    assert "is also an input" in _err_line(capsys)


def test_image_size_errors_name_the_file(dataset, tiny_model_dir, tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer

    from pebr_mega.data.decoders import make_image_decoder
    from pebr_mega.data.images import ImageConfig
    from pebr_mega.data.records import GRPORecord
    from pebr_mega.rollout.requests import RequestBuilder

    Image.new("RGB", (10, 10)).save(tmp_path / "tiny.png")
    Image.new("RGB", (600, 3)).save(tmp_path / "thin.png")
    records = [GRPORecord(qid=q, problem="<image>How many?", answer="1", images=[f"{q}.png"]) for q in ("tiny", "thin")]
    strict = ImageConfig(backend="pil", reject_small_sides=True)  # by default a side under 28 px is scaled up
    _, report = RequestBuilder(AutoTokenizer.from_pretrained(tiny_model_dir), make_image_decoder(strict),
                               max_prompt_length=4096).build(records, tmp_path)
    assert report.skipped["image"] == 2
    tiny, thin = report.examples["image"]
    assert str(tmp_path / "tiny.png") in tiny and "10x10" in tiny and "PIL image" not in tiny
    assert str(tmp_path / "thin.png") in thin and "PIL image" not in thin


def test_stage_result_is_standard_json():
    from pebr_mega.trainer.stage import StageResult

    res = StageResult(model_dir="m", steps=3, eval_after={"eval/accuracy": float("nan"), "eval/count": 2.0})
    text = json.dumps(res.to_dict(), allow_nan=False)  # raises on NaN / Infinity
    back = json.loads(text)
    assert back["mean_reward"] is None and back["eval_after"] == {"eval/accuracy": None, "eval/count": 2.0}
    assert not any(isinstance(v, float) and math.isnan(v) for v in back.values())


# -------------------------------------------------------------------------- items 4, 5 and 7: real kills
# The `kills` job (tests/trainer_scenarios.py with tests/kill_resume.py) SIGKILLs a tiny `pebr train` and a
# tiny `pebr pipeline` at fixed points (in an actor update, between a checkpoint's files and its manifest,
# right after a metrics row, in sampling), reruns each until it finishes, and compares with a run that was
# never interrupted.
@pytest.fixture(scope="module")
def kills(trainer_runs) -> dict:
    return trainer_runs["kills"]


@pytest.mark.parametrize("command", ["train", "pipeline"])
def test_sigkill_and_rerun_equals_an_uninterrupted_run(kills, command):
    from trainer_scenarios import PIPELINE_KILLS, TRAIN_KILLS

    got = kills[command]
    planned = TRAIN_KILLS if command == "train" else PIPELINE_KILLS
    # Every planned kill happened (a real SIGKILL), then one rerun finished with status 0 ...
    assert [tuple(r["kill"]) for r in got["runs"][:-1]] == [tuple(k) for k in planned]
    assert all(r["killed"] for r in got["runs"][:-1]) and got["runs"][-1] == {"kill": None, "killed": False, "rc": 0}
    # ... and after each kill the metrics were a prefix of the uninterrupted run's (no repeated or stale step),
    # and at the end every record (metrics, generations, result, rollouts, splits, DONE) and the exported
    # weights equal the uninterrupted run's, up to timings.
    assert got["problems"] == []


def test_force_restart_discards_the_run_and_an_empty_train_file_is_one_line(kills):
    got = kills["restart_empty"]
    last = got["log"].strip().splitlines()[-1]
    assert got["rc"] == 2 and "Traceback" not in got["log"], got["log"]
    assert last.startswith("pebr train: error: ") and "empty.json" in last and "no usable records" in last
    assert "build_actor" not in got["counts"] and "make_rollout_engine" not in got["counts"]  # before any model
    assert "checkpoints" not in got["left"] and "metrics.jsonl" not in got["left"]  # the old run is gone


# The child that runs `pebr sft` (kill_resume.run_child: `pebr_mega.cli.main` in a forked child that counts the
# model builds), in a fresh interpreter: the run initialises a process group, which the pytest process must not.
_SFT_CHILD = """
import json, sys
from pathlib import Path
import kill_resume
kill_resume.preload()
print(json.dumps([kill_resume.run_child(argv, Path(log)) for argv, log in json.loads(sys.argv[1])]))
"""


def test_sft_with_an_empty_train_file_is_one_line_before_any_model(tiny_model_dir, tmp_path):
    """`pebr sft` on an empty file and on an empty JSON list: status 2, one line naming the file, and neither the
    actor nor a rollout engine was built (as `pebr train` in the kills job)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    runs = []
    for name, content in (("empty.json", ""), ("list.json", "[]")):
        (tmp_path / name).write_text(content)
        argv = ["sft", f"sft.init_model={tiny_model_dir}", f"sft.train_file={tmp_path / name}",
                f"run.output_dir={tmp_path / ('run_' + name[:-5])}"]
        runs.append((argv, str(tmp_path / f"{name}.log")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run([sys.executable, "-c", _SFT_CHILD, json.dumps(runs)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (argv, _), got in zip(runs, json.loads(proc.stdout.strip().splitlines()[-1])):
        assert got["rc"] == 2 and "Traceback" not in got["log"], got["log"]
        errors = [line for line in got["log"].splitlines() if ": error: " in line]
        path = argv[2].split("=", 1)[1]
        assert errors == [f"pebr sft: error: {path}: no usable SFT conversations (read 0, skipped {{}})"], got["log"]
        assert got["log"].strip().splitlines()[-1] == errors[0]
        assert "build_actor" not in got["counts"] and "make_rollout_engine" not in got["counts"]  # before any model
        run = Path(argv[3].split("=", 1)[1])
        assert not (run / "checkpoints").exists() and not (run / "hf").exists()


def test_rerun_with_other_settings_is_one_line_naming_the_key(kills):
    got = kills["mismatch"]
    last = got["log"].strip().splitlines()[-1]
    assert got["rc"] == 2 and "Traceback" not in got["log"], got["log"]
    assert "made with other settings: actor.lr 0.001 -> 0.002; pass --force-restart" in last, last
    assert got["checkpoints"] == got["checkpoints_before"]  # nothing was touched
