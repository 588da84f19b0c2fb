"""How many CPU threads this process may usefully run, and torch's thread pool sized to it.

torch sizes its intra-op pool to the CPUs in the process's affinity mask. A container limited by a CPU quota
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`) rather than by a CPU set still shows every CPU of the host, so
torch starts one thread per host CPU and the kernel throttles them all to the quota: on a 2-CPU quota with 16
visible CPUs each op's threads wait for one another in turn. `cpu_budget()` is the smaller of the two;
`apply_cpu_budget()` caps torch (and OpenMP in child processes) to it unless the user chose a count
(`OMP_NUM_THREADS`, which torchrun also sets for several local ranks).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def quota_cpus(v2: Path = _CGROUP_V2, v1: tuple[Path, Path] = _CGROUP_V1) -> int | None:
    """The cgroup's CPU quota in whole CPUs (rounded up), or None when there is none or it cannot be read."""
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
        if v1[0].is_file() and v1[1].is_file():
            quota_us, period_us = int(v1[0].read_text()), int(v1[1].read_text())
            return None if quota_us <= 0 else max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        return None
    return None


def cpu_budget() -> int:
    """Threads that can run at once: the affinity mask's CPUs, capped by the cgroup quota."""
    quota = quota_cpus()
    cpus = affinity_cpus()
    return cpus if quota is None else min(cpus, quota)


def apply_cpu_budget() -> int | None:
    """Cap torch's intra-op threads to `cpu_budget()` when the quota is below the visible CPUs and the user set
    no `OMP_NUM_THREADS`; returns the cap applied (None when nothing changed). Call before heavy work starts."""
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    budget = cpu_budget()
    if budget >= affinity_cpus():
        return None
    os.environ["OMP_NUM_THREADS"] = str(budget)  # read by torch at import and by child processes
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(budget)
    return budget


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`), or the platform's processor string elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_record() -> dict:
    """What a CPU timing depends on: the CPU model, the CPUs visible and allowed, torch's thread counts."""
    import torch

    return {"cpu_model": cpu_model(), "cpus_visible": affinity_cpus(), "cpu_quota": quota_cpus(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
