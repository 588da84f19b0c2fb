"""tools/gpu_checks.sh's control flow on CPU: the global deadline, kills, skips and the wheel step.

The steps are replaced (CHECK_STEPS_FILE) by fakes: one that finishes, one that hangs with a child in its own
session (as torchrun's workers and SGLang's schedulers are), one that takes the rest of the budget, one that
comes too late; and the real `wheels` step with a carried folder holding a broken wheel. The script must end
by its budget plus the kill grace, leave no process of a killed step behind, report a timeout, a skip and
the wheels that do not import, and go on after each.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S, KILL_AFTER_S, RESERVE_S = 30, 1, 6


def _processes_with(marker_prefix: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(v.startswith(f"PEBR_GPU_STEP={marker_prefix}".encode()) for v in env):
                found.append(int(entry.name))
    return found


def test_gpu_checks_keeps_its_deadline_kills_hung_steps_and_goes_on(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    steps = tmp_path / "steps.txt"
    steps.write_text("\n".join([
        "ok 5 echo fine",
        "wheels 30 wheels",
        # hangs, with a grandchild in a session of its own (out of timeout's process group)
        "hang 3 setsid sleep 300 & sleep 300",
        "rest rest sleep 300",
        "late 10 echo too late",
    ]) + "\n")
    env = {**os.environ, "CHECK_STEPS_FILE": str(steps), "BUDGET_S": str(BUDGET_S), "RESERVE_S": str(RESERVE_S),
           "MIN_STEP_S": "2", "KILL_AFTER_S": str(KILL_AFTER_S), "WHEEL_DIR": str(wheels),
           "SITE": str(tmp_path / "site")}
    t0 = time.monotonic()
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_checks.sh"), str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert run.returncode == 0, run.stderr
    # the budget holds: the kill grace and the reaps' pauses are inside it (RESERVE_S), only the shell's own
    # last lines come after
    assert elapsed < BUDGET_S + 2, (elapsed, summary)
    assert "=== ok: rc 0" in summary
    assert "=== hang: TIMED OUT" in summary and "reap hang." in summary
    assert "=== rest: TIMED OUT" in summary  # given what was left of the budget, not its own 300 s
    assert "=== late: SKIPPED (deadline" in summary
    assert _processes_with("hang.") == [] and _processes_with("rest.") == []
    wheel_log = (tmp_path / "out" / "wheels.log").read_text()
    assert f"wheels: installing {wheels} failed" in wheel_log
    assert "wheels: sglang does NOT import" in wheel_log and "wheels: torch imports" in wheel_log
    assert "gpu_checks: done in" in summary
