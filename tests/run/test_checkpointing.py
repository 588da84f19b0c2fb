"""Checkpoint verification (issue 12, item 8): a damaged newest checkpoint is named and skipped, never loaded.

The checkpoints hold what a run writes: a Megatron distributed checkpoint (`.metadata`, `*.distcp`, written
by megatron-core in a subprocess) and a pickled trainer state. Each kind of damage the issue found (a
truncated file, an emptied file, a missing `.metadata`, overwritten bytes) used to surface as a raw
EOFError / UnpicklingError, or to load silently into wrong numbers.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from pebr_mega.run.stage_checkpoints import (MANIFEST, CheckpointManager, CheckpointWarning, verify_checkpoint,
                                             write_manifest)

ROOT = Path(__file__).resolve().parents[2]
SAVE = """
import sys, torch
from pebr_mega.checkpoint.convert import single_rank_world

if __name__ == "__main__":
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    with single_rank_world():
        w = torch.arange(4096, dtype=torch.float32).reshape(64, 64)
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", w, replica_id=0)}, sys.argv[1])
"""


@pytest.fixture(scope="module")
def megatron_ckpt(tmp_path_factory) -> Path:
    """A real Megatron distributed checkpoint of one 64x64 tensor."""
    root = tmp_path_factory.mktemp("mcore")
    script = root / "save.py"
    script.write_text(textwrap.dedent(SAVE))
    out = root / "actor"
    out.mkdir()
    # A fresh one-rank world: not the address of a process group this test process may hold.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / ".metadata").is_file() and list(out.glob("*.distcp"))
    return out


def _run_with_checkpoints(tmp_path: Path, megatron_ckpt: Path, steps=(10, 20)) -> CheckpointManager:
    m = CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    for step in steps:
        def write(d, step=step):
            shutil.copytree(megatron_ckpt, d / "actor")
            torch.save({"step": step, "rng": torch.get_rng_state()}, d / "trainer_state.pt")
        m.save(step, write)
    return m


def _largest_distcp(ckpt: Path) -> Path:
    return max((ckpt / "actor").glob("*.distcp"), key=lambda p: p.stat().st_size)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _overwrite_middle(p: Path) -> None:
    data = bytearray(p.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = b"\xff" * 64  # same size, other bytes
    p.write_bytes(bytes(data))


DAMAGE = {
    "truncated trainer state": (lambda c: _truncate(c / "trainer_state.pt"), "trainer_state.pt is"),
    "emptied trainer state": (lambda c: (c / "trainer_state.pt").write_bytes(b""), "trainer_state.pt is 0 bytes"),
    "garbage trainer state": (lambda c: _overwrite_middle(c / "trainer_state.pt"), "trainer_state.pt does not match"),
    "missing .metadata": (lambda c: (c / "actor" / ".metadata").unlink(), "actor/.metadata is missing"),
    "truncated tensor file": (lambda c: _truncate(_largest_distcp(c)), ".distcp is"),
    "emptied tensor file": (lambda c: _largest_distcp(c).write_bytes(b""), ".distcp is 0 bytes"),
    "garbage tensor bytes": (lambda c: _overwrite_middle(_largest_distcp(c)), ".distcp does not match"),
    "garbage manifest": (lambda c: (c / MANIFEST).write_bytes(b"\x00\x01garbage"), "MANIFEST.json is unreadable"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_skipped(kind, tmp_path, megatron_ckpt):
    m = _run_with_checkpoints(tmp_path, megatron_ckpt)
    assert m.latest() == m.path(20) and verify_checkpoint(m.path(20)) is None
    damage, expected = DAMAGE[kind]
    damage(m.path(20))
    problem = verify_checkpoint(m.path(20))
    assert problem is not None and expected in problem, problem
    with pytest.warns(CheckpointWarning, match=rf"step_20 is damaged \(.*{expected.split()[0]}"):
        latest = m.latest()
    assert latest == m.path(10)
    assert torch.load(latest / "trainer_state.pt", weights_only=False)["step"] == 10


def test_every_checkpoint_damaged_means_no_checkpoint(tmp_path, megatron_ckpt):
    m = _run_with_checkpoints(tmp_path, megatron_ckpt)
    for step in (10, 20):
        (m.path(step) / "actor" / ".metadata").unlink()
    with pytest.warns(CheckpointWarning):
        assert m.latest() is None


def test_manifest_is_written_last_and_lists_every_file(tmp_path, megatron_ckpt):
    m = _run_with_checkpoints(tmp_path, megatron_ckpt, steps=(10,))
    ckpt = m.path(10)
    import json

    listed = {e["path"] for e in json.loads((ckpt / MANIFEST).read_text())["files"]}
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert listed == on_disk and "COMPLETE" in listed and "actor/.metadata" in listed
    newest = max(ckpt.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == MANIFEST


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    d = tmp_path / "checkpoints" / "step_3"
    d.mkdir(parents=True)
    (d / "COMPLETE").write_text("{}")
    m = CheckpointManager(tmp_path / "checkpoints")
    with pytest.warns(CheckpointWarning, match="no MANIFEST.json"):
        assert m.latest() == d
    write_manifest(d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.latest() == d


def test_pruning_never_counts_a_damaged_checkpoint_as_kept(tmp_path, megatron_ckpt):
    m = _run_with_checkpoints(tmp_path, megatron_ckpt, steps=(10, 20))
    m.keep_last = 2
    _truncate(_largest_distcp(m.path(20)))  # the newest is damaged on disk
    m.save(30, lambda d: (shutil.copytree(megatron_ckpt, d / "actor"),
                          torch.save({"step": 30}, d / "trainer_state.pt")))
    # Kept: the two newest intact ones (30 and 10); the damaged 20 is removed, never counted.
    assert m.steps() == [10, 30] and verify_checkpoint(m.path(10)) is None
    assert not list(m.root.glob(".del-step_*"))


def _latest_on_two_ranks(rank: int, root: str) -> str | None:
    import torch.distributed as dist

    from pebr_mega.run import stage_checkpoints as checkpointing

    dist.init_process_group("gloo")  # the launcher's RANK, WORLD_SIZE and MASTER_* are set

    if rank == 1:  # only rank 0 reads the files; rank 1 takes its verdict
        def refuse(path):
            raise AssertionError(f"rank 1 verified {path}")

        checkpointing.verify_checkpoint = refuse
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        latest = CheckpointManager(root).latest()
    return None if latest is None else Path(latest).name


def test_rank_zero_verifies_and_every_rank_takes_its_verdict(tmp_path, megatron_ckpt):
    from pebr_mega.parallel.launch import spawn

    m = _run_with_checkpoints(tmp_path, megatron_ckpt)
    (m.path(20) / "actor" / ".metadata").unlink()
    assert spawn(_latest_on_two_ranks, 2, str(m.root), megatron_only=False) == ["step_10", "step_10"]
