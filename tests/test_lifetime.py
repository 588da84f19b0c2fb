"""Child processes die with a SIGKILLed parent (issue 12, item 10).

Each test starts a small process that creates the children a real run creates, SIGKILLs it, and checks that
none of its descendants is left. Without `pebr_mega.lifetime`, Megatron's checkpoint-writer manager (~270 MB)
and the multiprocessing resource tracker outlived the run, and a reward worker stuck grading an answer would
spin forever.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

MEGATRON_SAVE = """
import sys, tempfile, time, torch
from pebr_mega.checkpoint.convert import single_rank_world
from pebr_mega.checkpoint.dist import save_checkpoint

class Tiny(torch.nn.Module):  # what save_checkpoint needs: a sharded state dict
    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing import ShardedTensor
        return {"w": ShardedTensor.from_rank_offsets("w", torch.zeros(4), replica_id=0)}

if __name__ == "__main__":
    with single_rank_world():
        save_checkpoint(Tiny(), tempfile.mkdtemp() + "/ckpt", {"hf_config": {}})
        print("ready", flush=True)
        time.sleep(600)
"""

STUCK_REWARD = """
import time
from pebr_mega.rewards.guard import RewardPool
from pebr_mega.rewards.text import accuracy_reward

if __name__ == "__main__":
    pool = RewardPool(timeout_s=600, num_workers=2)
    pool.run([(abs, (-1,))])  # both workers up
    print("ready", flush=True)
    pool.run([(accuracy_reward, ("### The final answer is: 9**9**9**9", "1.5"))])  # never returns in time
"""


def _kill_and_list_survivors(script: str, tmp_path: Path, wait_s: float = 10.0) -> tuple[list[str], list]:
    """Run `script` until it prints "ready", SIGKILL it; returns (its descendants' command lines, the survivors)."""
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(script))
    # A fresh one-rank world: not the address of a process group this test process may hold.
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                             "LOCAL_RANK")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()[-3000:]
        time.sleep(0.5)  # let the last call start
        children = psutil.Process(proc.pid).children(recursive=True)
        names = _names(children)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + wait_s
        alive = children
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [c for c in alive if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        return names, alive
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _names(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(" ".join(p.cmdline())[:100])
        except psutil.Error:
            out.append(str(p.pid))
    return out


def test_megatron_checkpoint_writer_manager_dies_with_a_killed_run(tmp_path):
    children, alive = _kill_and_list_survivors(MEGATRON_SAVE, tmp_path)
    for p in alive:  # clean up before failing
        p.kill()
    assert any("multiprocessing.spawn" in n for n in children), children  # the manager existed
    assert not alive, f"left running after SIGKILL: {_names(alive)}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_reward_worker_stuck_in_a_computation_dies_with_a_killed_run(tmp_path):
    children, alive = _kill_and_list_survivors(STUCK_REWARD, tmp_path)
    for p in alive:
        p.kill()
    assert sum("worker_main" in n for n in children) == 2, children  # both workers, one of them stuck
    assert not alive, f"left running after SIGKILL: {_names(alive)}"
