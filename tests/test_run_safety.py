"""Issue 23 ("nothing lost, nothing silently wrong, round two"), reproduced where the user meets it: the `pebr`
command and the checkpoint tools, in real processes where the case is about processes.

- a run directory whose first checkpoint came before any applied update resumes (item 1);
- two processes on one output directory: the second is refused naming the first, a kill -9 leaves no lock
  that blocks a rerun (item 2);
- a damaged checkpoint is refused by every reader (item 3);
- a diverged run stops with one line and exports nothing as final (item 5);
- ordinary OS errors are one line naming the path and the operation (item 7);
- the dry run fails where the run does; an interrupted export leaves no temporary; weights get the usual
  file mode (item 10).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pebr_mega.checkpoint.hf_io import check_hf_model_dir
from pebr_mega.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A tiny synthetic set (grpo.json, sft.json, eval.json, images/), written by `pebr synth`."""
    out = tmp_path_factory.mktemp("data") / "synth"
    assert main(["synth", "--out", str(out), "--num", "8", "--num-sft", "8", "--num-eval", "2"]) == 0
    return out


def tiny_train(run: Path, model: Path, train_file: Path, *extra: str) -> list[str]:
    """`pebr train` of a tiny GRPO stage (2 prompts per step, one update each, a checkpoint every step)."""
    return ["train", f"run.output_dir={run}", "model.spec=torch", "model.params_dtype=float32",
            "images.min_pixels=3136", "images.max_pixels=50176", "logging.progress_bar=false", "rollout.n=2",
            "rollout.max_new_tokens=8", "actor.micro_batch_tokens=2048", "grpo.stage=stage2",
            f"grpo.init_model={model}", f"grpo.train_file={train_file}", "grpo.rollout_batch_size=2",
            "grpo.mini_batch_size=2", "grpo.max_steps=2", "grpo.save_every=1", "grpo.shuffle=false",
            "actor.lr=1e-3", "rewards.num_workers=1", *extra]


def tiny_sft(run: Path, model: Path, data: Path, *extra: str) -> list[str]:
    """`pebr sft` of a tiny warm-up (batches of 4, one epoch, a checkpoint every step)."""
    return ["sft", f"run.output_dir={run}", "model.spec=torch", "model.params_dtype=float32",
            "images.min_pixels=3136", "images.max_pixels=50176", "logging.progress_bar=false",
            "actor.micro_batch_tokens=2048", f"sft.init_model={model}", f"sft.train_file={data / 'sft.json'}",
            "sft.batch_size=4", "sft.epochs=1", "sft.save_every=1", *extra]


# The child that runs `pebr` commands in turn (kill_resume.run_child: `pebr_mega.cli.main` in a forked child,
# SIGKILLed by itself at a kill point when asked), in a fresh interpreter: a run initialises a process group,
# which the pytest process must not.
_CHILD = """
import json, sys
from pathlib import Path
import kill_resume
kill_resume.preload()
runs = json.loads(sys.argv[1])
print(json.dumps([kill_resume.run_child(argv, Path(log), tuple(kill) if kill else None) for argv, log, kill in runs]))
"""


def run_in_children(runs: list[tuple[list[str], Path, tuple | None]]) -> list[dict]:
    """Each (argv, log, kill) as `kill_resume.run_child` runs it, one after the other; what each reported."""
    payload = json.dumps([(argv, str(log), kill) for argv, log, kill in runs])
    proc = subprocess.run([sys.executable, "-c", _CHILD, payload], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if ": error: " in line]


# ------------------------------------------------------------------ item 1: a checkpoint before any update
def test_checkpoint_saved_before_the_first_update_resumes(dataset, tiny_model_dir, tmp_path):
    """The issue's reproduction: the first batch's images are cut after their headers, so no request of it can
    be built and step 1 trains nothing; step_1 is saved (Adam has no state yet); the run is SIGKILLed while it
    saves step 2; the rerun resumes from step_1 and finishes (it used to fail on every rerun with
    `KeyError: 'optimizer.state.exp_avg...'`)."""
    records = json.loads((dataset / "grpo.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    for i, r in enumerate(records):
        data = (dataset / r["images"][0]).read_bytes()
        (images / Path(r["images"][0]).name).write_bytes(data[:120] if i < 2 else data)  # batch 1: headers only
        r["images"] = [f"images/{Path(r['images'][0]).name}"]
    train_file = tmp_path / "grpo.json"
    train_file.write_text(json.dumps(records))
    argv = tiny_train(tmp_path / "run", tiny_model_dir, train_file)
    killed, rerun = run_in_children([(argv, tmp_path / "killed.log", ("save", 2)),
                                     (argv, tmp_path / "rerun.log", None)])
    assert killed["killed"], killed["log"]
    assert "no request of the batch could be built" in killed["log"]
    assert rerun["rc"] == 0 and "Traceback" not in rerun["log"], rerun["log"]
    assert "resumed from" in rerun["log"] and "(step 1)" in rerun["log"], rerun["log"]
    assert (tmp_path / "run" / "hf" / "model.safetensors").is_file()


# ------------------------------------------------------------------ item 2: one process per output directory
def _wait_for_lock(lock_file: Path, pid: int, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    """The lock file's record once the process `pid` has written it (it holds the lock from then on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            info = json.loads(lock_file.read_text())
            if info.get("pid") == pid:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{lock_file} never named pid {pid}")


def _pebr(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pebr_mega", *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _second_process_refused_then_stale_lock_ignored(argv: list[str], lock_file: Path, what: str) -> None:
    """Start `pebr argv`; once it holds its lock, freeze it (SIGSTOP: it keeps the lock, deterministically); a
    second identical command is refused with one line naming the first's pid and host; after a kill -9 of the
    first, the lock file is left behind and a rerun runs to the end."""
    import socket

    first = subprocess.Popen([sys.executable, "-m", "pebr_mega", *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        info = _wait_for_lock(lock_file, first.pid, first)
        os.kill(first.pid, signal.SIGSTOP)
        second = _pebr(*argv)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert error_lines(second.stderr) == [second.stderr.strip().splitlines()[-1]], second.stderr
        line = error_lines(second.stderr)[0]
        assert f"{what} " in line and f"is in use by pid {first.pid} on host {socket.gethostname()}" in line, line
        assert info["host"] == socket.gethostname()
    finally:
        first.kill()  # SIGKILL: works on a stopped process too
        first.wait(60)
    assert lock_file.is_file()  # left by the kill, and no obstacle:
    rerun = _pebr(*argv)
    assert rerun.returncode == 0, rerun.stderr[-3000:]


def test_two_trainings_in_one_run_directory(dataset, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    _second_process_refused_then_stale_lock_ignored(
        tiny_train(run, tiny_model_dir, dataset / "grpo.json"), run / ".pebr-lock", "run.output_dir")


def test_two_samplings_into_one_output(dataset, tiny_model_dir, tmp_path):
    out = tmp_path / "rollouts.jsonl"
    argv = ["sample", f"sample.model={tiny_model_dir}", f"sample.dataset={dataset / 'grpo.json'}",
            f"sample.output={out}", "sample.n=2", "rollout.max_new_tokens=8", "images.min_pixels=3136",
            "images.max_pixels=50176", "sample.max_pixels=50176"]
    _second_process_refused_then_stale_lock_ignored(argv, tmp_path / ".rollouts.jsonl.pebr-lock", "sample.output")
    assert len(out.read_text().splitlines()) == 16  # 8 questions x 2, written once


# ------------------------------------------------------------------ items 3 and 10: checkpoints and exports
@pytest.fixture(scope="module")
def mcore(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model converted to a Megatron checkpoint by the tool (which writes its MANIFEST.json)."""
    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    got = subprocess.run([sys.executable, "tools/convert_hf_to_mcore.py", "--hf-dir", str(tiny_model_dir), "--out",
                          str(out), "--quiet"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    assert (out / "MANIFEST.json").is_file()
    return out


def _export(mcore_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/export_to_hf.py", "--mcore-dir", str(mcore_dir), "--out", str(out),
                           "--quiet", *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _largest_shard(ckpt: Path) -> Path:
    return max((p for p in ckpt.rglob("*.distcp")), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["overwritten", "truncated"])
def test_damaged_checkpoint_is_refused_by_export_and_the_readers(damage, mcore, tiny_model_dir, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(mcore, ckpt)
    shard = _largest_shard(ckpt)
    data = bytearray(shard.read_bytes())
    if damage == "overwritten":  # 4 KB of garbage in the middle, the size unchanged
        mid = len(data) // 2
        data[mid:mid + 4096] = os.urandom(4096)
    else:
        data = data[: len(data) // 2]
    shard.write_bytes(bytes(data))
    got = _export(ckpt, tmp_path / "hf")
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr[-3000:]
    line = got.stderr.strip().splitlines()[-1]
    why = "does not match its checksum" if damage == "overwritten" else f"is {len(data)} bytes"
    assert line.startswith(f"export_to_hf: error: --mcore-dir {ckpt} is damaged: {shard} {why}"), line
    assert "--skip-verify" in line and not (tmp_path / "hf").exists()
    # the logit comparison reads it too: refused before any model is built
    assert main(["compare-logits", "--hf-dir", str(tiny_model_dir), "--mcore-dir", str(ckpt), "--spec", "torch"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"pebr compare-logits: error: --mcore-dir {ckpt} is damaged: {shard} {why}"), line
    if damage == "overwritten":  # forensics: the override exports it anyway, saying so
        forced = _export(ckpt, tmp_path / "hf", "--skip-verify")
        assert forced.returncode == 0 and "not verified" in forced.stderr, forced.stderr[-3000:]


def test_an_export_carries_a_manifest_that_eval_checks(mcore, tmp_path, dataset, capsys):
    out = tmp_path / "hf"
    stale = tmp_path / ".hf.tmp-0badc0de"  # what a kill -9 mid-export left: removed by the next export
    stale.mkdir()
    got = _export(mcore, out)
    assert got.returncode == 0, got.stderr[-3000:]
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (out / "MANIFEST.json").is_file()
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct((out / "config.json").stat().st_mode & 0o777)
    weights = out / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-4096] + bytes(4096))
    assert main(["eval", "--model", str(out), "--dataset", str(dataset / "eval.json")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"pebr eval: error: --model {out} is damaged: {weights} does not match its checksum"), line
    weights.write_bytes(whole)
    (out / "generation_config.json").write_text("{}\n")  # the user's to edit: not a damage
    check_hf_model_dir(out, "--model")


# A child that converts nothing itself: it runs the export tool with its shard writer wrapped so that the process
# gets a real SIGTERM in the middle of writing the weights.
_SIGTERM_EXPORT = """
import os, signal, sys
sys.path.insert(0, "tools")
import pebr_mega.checkpoint.convert as convert
real = convert.write_safetensors
def writing_then_terminated(out, tensors, **kw):
    next(iter(tensors))
    os.kill(os.getpid(), signal.SIGTERM)
    return real(out, tensors, **kw)
convert.write_safetensors = writing_then_terminated
import export_to_hf
sys.exit(export_to_hf.main(sys.argv[1:]))
"""


def _export_in_child(script: str, mcore: Path, out: Path) -> subprocess.CompletedProcess:
    """`tools/export_to_hf.py` run by `script` (which patches the writer first) in its own process."""
    return subprocess.run([sys.executable, "-c", script, "--mcore-dir", str(mcore), "--out", str(out), "--quiet"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_sigterm_during_an_export_removes_its_temporary(mcore, tmp_path):
    got = _export_in_child(_SIGTERM_EXPORT, mcore, tmp_path / "hf")
    assert got.returncode == 130 and "Traceback" not in got.stderr, got.stderr[-3000:]
    line = got.stderr.strip().splitlines()[-1]
    assert line.startswith(f"interrupted (SIGTERM) while writing {tmp_path / 'hf'}: removed its temporary directory"), line
    assert list(tmp_path.iterdir()) == []  # no temporary, no lock file, no half export


def test_dry_run_fails_where_the_run_refuses(dataset, tiny_model_dir, tmp_path, capsys):
    """rollout.max_new_tokens over the model's positions: the real start-up refuses it, so does the dry run."""
    argv = [f"run.output_dir={tmp_path / 'run'}", "grpo.stage=stage2", f"grpo.init_model={tiny_model_dir}",
            f"grpo.train_file={dataset / 'grpo.json'}", "grpo.rollout_batch_size=4", "grpo.mini_batch_size=2",
            "rollout.max_new_tokens=6000"]
    assert main(["train", *argv]) == 2
    real = capsys.readouterr().err.strip()
    assert main(["train", "--dry-run", *argv]) == 2
    dry = capsys.readouterr().err.strip()
    assert "rollout.max_new_tokens=6000" in real and dry == real, (real, dry)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ item 5: diverged runs are not exported
def test_diverged_runs_stop_before_saving_or_exporting(dataset, tiny_model_dir, tmp_path):
    """`sft.lr=1e6`: step 1 applies a huge update, the next ones are skipped as non-finite; `actor.lr=1e6` in a
    GRPO stage likewise. Each run stops at the step where most of its updates are skipped, with one line and
    status 2: that step is not saved, no model is exported, and the newest checkpoint (the resume point) is the
    one before. The SFT console shows the skipped updates as GRPO's does."""
    sft_run, grpo_run = tmp_path / "sft", tmp_path / "grpo"
    sft = tiny_sft(sft_run, tiny_model_dir, dataset, "sft.batch_size=2", "sft.lr=1e6")
    grpo = tiny_train(grpo_run, tiny_model_dir, dataset / "grpo.json", "grpo.max_steps=4", "actor.lr=1e6")
    got = run_in_children([(sft, tmp_path / "sft.log", None), (grpo, tmp_path / "grpo.log", None)])
    for run, res, stage, key in ((sft_run, got[0], "sft", "sft.lr"), (grpo_run, got[1], "stage2", "actor.lr")):
        log = res["log"]
        assert res["rc"] == 2 and "Traceback" not in log, log
        last = log.strip().splitlines()[-1]
        assert error_lines(log) == [last], log
        assert last.startswith(f"pebr {'sft' if stage == 'sft' else 'train'}: error: {stage} diverged at step 3: "
                               "2 of 3 updates were skipped as non-finite"), last
        assert f"the newest checkpoint is {run / 'checkpoints' / 'step_2'}, where a rerun resumes" in last
        assert f"lower {key}" in last
        assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_2"  # step 3 is not saved
        assert not (run / "checkpoints" / "step_3").exists()
        assert not (run / "hf").exists() and not (run / "result.json").exists()
        assert "updates skipped: non-finite" in log
        assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_divergence_guard_rules():
    """The guard's rules: non-finite weights stop at once; skipped updates stop the run from 2 on when they
    outnumber the applied ones (one bad batch does not); at the end one skipped update not outweighed does."""
    from pebr_mega.trainer.divergence import DivergedError, DivergenceGuard

    def where() -> str:
        return "the newest checkpoint is X"

    guard = DivergenceGuard("stage2", "actor.lr", applied_at_start=5)
    guard.check(1, 6, True, where)
    with pytest.raises(DivergedError, match="stage2 diverged at step 2: the weights are no longer finite"):
        guard.check(2, 7, False, where)
    guard = DivergenceGuard("sft", "sft.lr")
    guard.observe({"skipped_updates": 1.0})
    guard.check(1, 0, True, where)  # one bad batch
    guard.observe({"skipped_updates": 0.0})
    guard.check(2, 1, True, where)
    guard.observe({"skipped_updates": 1.0})
    with pytest.raises(DivergedError, match=r"2 of 3 updates were skipped .* the newest checkpoint is X \(lower sft.lr"):
        guard.check(3, 1, True, where)
    final = DivergenceGuard("stage1", "actor.lr")
    final.observe({"skipped_batches": 1.0})  # a step that ran no update
    final.check_final(1, 0, where)
    final.observe({"skipped_updates": 1.0})
    with pytest.raises(DivergedError, match="1 of 1 updates were skipped"):
        final.check_final(2, 0, where)


def test_summary_of_a_stage_without_a_finite_reward():
    """Every reward non-finite (written as null): the stage's summary has none, not a TypeError."""
    from pebr_mega.trainer.grpo import GRPOTrainer
    from pebr_mega.trainer.stage import StageResult

    result = StageResult(model_dir="m", steps=2)
    GRPOTrainer.summarize(None, result, [{"step": 1, "reward/total": None}, {"step": 2, "reward/total": None}])
    assert result.to_dict()["mean_reward"] is None and result.to_dict()["last_reward"] is None


# ------------------------------------------------------------------ item 7: OS errors are one line
# A child that runs one `pebr` command after a hook (the OS errors are real: writes go to /dev/full, which fails
# every write with ENOSPC).
_HOOKED = """
import json, sys
argv = json.loads(sys.argv[1])
exec(HOOK)
from pebr_mega.cli import main
sys.exit(main(argv))
"""

# The second metrics row goes to a full disk.
_METRICS_TO_DEV_FULL = """
import pebr_mega.logging as lg
real = lg.MetricsLogger._write_row
def full_disk_from_step_2(self, step, line):
    if step >= 2 and self._file.name != "/dev/full":
        self._file.close()
        self._file = open("/dev/full", "a", encoding="utf-8")
    return real(self, step, line)
lg.MetricsLogger._write_row = full_disk_from_step_2
"""

# Step 2's checkpoint save meets a full disk: its trainer state is written to /dev/full (torch's zip writer turns
# the ENOSPC into `RuntimeError: ... unexpected pos ...`), and the device says it has no space left.
_SAVE_TO_DEV_FULL = """
import os
import pebr_mega.errors as errors
import pebr_mega.run.stage_checkpoints as ck
real = ck.CheckpointManager.prepare
def prepare_on_a_full_disk(self, step):
    tmp = real(self, step)
    if step == 2:
        os.symlink("/dev/full", tmp / ck.TRAINER_STATE)
        errors._free_bytes = lambda path: 0
    return tmp
ck.CheckpointManager.prepare = prepare_on_a_full_disk
"""


def _run_hooked(hook: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", f"HOOK = {hook!r}\n" + _HOOKED, json.dumps(argv)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("where", ["metrics", "checkpoint"])
def test_a_full_disk_is_one_line_and_the_last_good_state_resumes(where, dataset, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    argv = tiny_train(run, tiny_model_dir, dataset / "grpo.json", "grpo.max_steps=3")
    got = _run_hooked(_METRICS_TO_DEV_FULL if where == "metrics" else _SAVE_TO_DEV_FULL, argv)
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr[-3000:]
    last = got.stderr.strip().splitlines()[-1]
    assert error_lines(got.stderr) == [last], got.stderr
    if where == "metrics":
        assert last.startswith(f"pebr train: error: writing the metrics of step 2: {run / 'metrics.jsonl'}: no space "
                               "left on the device (ENOSPC); the newest checkpoint is intact"), last
    else:
        assert last.startswith(f"pebr train: error: saving the checkpoint of step 2: "
                               f"{run / 'checkpoints' / '.tmp-step_2'}: no space left on the device"), last
        assert f"the newest checkpoint is still {run / 'checkpoints' / 'step_1'}" in last, last
        assert not (run / "checkpoints" / ".tmp-step_2").exists()  # its space is given back
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]
    rerun = _pebr(*argv)
    assert rerun.returncode == 0 and "resumed from" in rerun.stderr + rerun.stdout, rerun.stderr[-3000:]


def test_read_only_and_unreadable_paths_are_one_line(dataset, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """A directory the OS refuses to create (/sys: EPERM even for root), a read-only file system and an
    unreadable file (simulated: the tests run as root, whom chmod does not stop): one line naming the path."""
    import errno

    import pebr_mega.cli as cli

    assert main(["synth", "--out", "/sys/pebr-test-out", "--num", "2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("pebr synth: error: in ") and "/sys/pebr-test-out" in line \
        and "operation not permitted (EPERM)" in line, line
    assert main(["train", *tiny_train(Path("/sys/pebr-test-run"), tiny_model_dir, dataset / "grpo.json")[1:]]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "/sys/pebr-test-run" in line and "(EPERM)" in line and line.count("\n") == 0, line

    def read_only(out, cfg):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(out) / "grpo.json"))

    monkeypatch.setattr(cli, "write_synthetic_dataset", read_only)
    assert main(["synth", "--out", str(tmp_path / "synth"), "--num", "2"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"pebr synth: error: in _cmd_synth: {tmp_path / 'synth' / 'grpo.json'}: read-only "
                    "file system (EROFS)"), line

    def unreadable(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dataset / "grpo.json"))

    monkeypatch.setattr(cli, "split_files", unreadable)
    rollouts = tmp_path / "r.jsonl"
    rollouts.write_text("")
    assert main(["split", "--rollouts", str(rollouts), "--dataset", str(dataset / "grpo.json"), "--out-dir",
                 str(tmp_path / "split")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.endswith(f"{dataset / 'grpo.json'}: permission denied (EACCES)"), line


# The export tool meets a full disk while it writes the weights.
_EXPORT_ON_A_FULL_DISK = """
import errno, sys
sys.path.insert(0, "tools")
import pebr_mega.checkpoint.convert as convert
def full_disk(out, tensors, **kw):
    raise OSError(errno.ENOSPC, "No space left on device", str(out / "shard-00000.tmp.safetensors"))
convert.write_safetensors = full_disk
import export_to_hf
sys.exit(export_to_hf.main(sys.argv[1:]))
"""


def test_a_full_disk_during_an_export_is_one_line(mcore, tmp_path):
    got = _export_in_child(_EXPORT_ON_A_FULL_DISK, mcore, tmp_path / "hf")
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr[-3000:]
    line = got.stderr.strip().splitlines()[-1]
    assert line.startswith(f"export_to_hf: error: exporting to {tmp_path / 'hf'}: {tmp_path}/.hf.tmp-") and \
        line.endswith("shard-00000.tmp.safetensors: no space left on the device (ENOSPC)"), line
    assert list(tmp_path.iterdir()) == []  # the unfinished export and the lock file are gone
