"""parallel.threads: the CPU quota read from cgroup v1 and v2 files, and torch's pool capped to it only when the
quota is below the visible CPUs and the user chose no OMP_NUM_THREADS."""
from __future__ import annotations

import pytest
import torch

from pebr_mega.parallel import threads


def test_quota_from_cgroup_v2_and_v1(tmp_path):
    v2 = tmp_path / "cpu.max"
    v1 = (tmp_path / "quota", tmp_path / "period")
    assert threads.quota_cpus(v2, v1) is None  # neither file: no quota
    v2.write_text("150000 100000\n")
    assert threads.quota_cpus(v2, v1) == 2  # 1.5 CPUs rounds up
    v2.write_text("max 100000\n")
    assert threads.quota_cpus(v2, v1) is None
    v2.unlink()
    v1[0].write_text("300000\n")
    v1[1].write_text("100000\n")
    assert threads.quota_cpus(v2, v1) == 3
    v1[0].write_text("-1\n")
    assert threads.quota_cpus(v2, v1) is None
    v1[0].write_text("garbage\n")
    assert threads.quota_cpus(v2, v1) is None


@pytest.fixture
def restore_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield monkeypatch
    torch.set_num_threads(before)


def test_budget_caps_torch_only_below_the_visible_cpus(restore_threads):
    mp = restore_threads
    mp.setattr(threads, "affinity_cpus", lambda: 16)
    mp.setattr(threads, "quota_cpus", lambda: 2)
    assert threads.cpu_budget() == 2
    assert threads.apply_cpu_budget() == 2
    assert torch.get_num_threads() == 2 and threads.os.environ["OMP_NUM_THREADS"] == "2"
    mp.delenv("OMP_NUM_THREADS")
    mp.setattr(threads, "quota_cpus", lambda: None)
    assert threads.cpu_budget() == 16 and threads.apply_cpu_budget() is None
    mp.setattr(threads, "quota_cpus", lambda: 2)
    mp.setenv("OMP_NUM_THREADS", "5")  # the user's (or torchrun's) choice wins
    assert threads.apply_cpu_budget() is None


def test_machine_record_names_cpu_and_threads():
    record = threads.machine_record()
    assert record["cpu_model"] and record["cpus_visible"] >= 1
    assert record["torch_threads"] == torch.get_num_threads()
