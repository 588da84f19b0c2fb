"""The start-up checks of `pebr train`, `sft`, `sample` and `pipeline`, for the real run and its `--dry-run`.

`startup_checks(cfg, command, world)` is the one function that lists what stops a command from starting on a
`World` (its processes and the GPUs they see): the divisibility and size rules (`plan/checks.py`), one GPU per
process on a node, and every input path the command opens (`plan/paths.py`). It reads the config, the model's
`config.json` and the inputs' metadata, and changes nothing. The real run checks it on the launcher's world
(`World.of_launcher`) and the dry run on the world the run will have (`World.for_dry_run`); both stop with
`raise_failed`, which names every failure, so a dry run fails exactly where the run would.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pebr_mega.plan.checks import CheckResult, StartupCheckError, run_checks
from pebr_mega.plan.paths import check_inputs

_NO_LAUNCHER = "no launcher: WORLD_SIZE unset; under torchrun it is --nproc-per-node x nodes"


@dataclass(frozen=True)
class World:
    """The processes a run has and the GPUs it sees: what the start-up rules are checked against."""

    size: int
    gpus_per_node: int | None = None  # processes per node (the launcher's LOCAL_WORLD_SIZE); None: unknown
    devices: int | None = None  # GPUs visible to each process here (0: a CPU run); None: not this machine's world
    source: str | None = None  # where `size` came from, named when a rule about the world fails

    @classmethod
    def of_launcher(cls) -> "World":
        """The world of the process running now: the launcher's WORLD_SIZE and LOCAL_WORLD_SIZE (one process
        without a launcher) and the GPUs visible here."""
        launched = os.environ.get("WORLD_SIZE")
        return cls(int(launched or "1"), _local_world_size(), _visible_gpus(),
                   "WORLD_SIZE from the launcher" if launched else _NO_LAUNCHER)

    @classmethod
    def for_dry_run(cls, cfg: Any, world_size: int | None = None) -> "World":
        """The world a dry run checks: `--world-size`, else the launcher's WORLD_SIZE, else the GPUs visible
        here (a one-GPU machine cannot hold model.tp=3), else, with no GPU (a laptop, a login node), the
        smallest world the layout runs on (model.tp x model.pp), so a plan made there fails only where the run
        would."""
        gpus = _visible_gpus()
        if world_size is not None:
            return cls(world_size, _local_world_size(), gpus, "--world-size")
        if os.environ.get("WORLD_SIZE"):
            return cls.of_launcher()
        if gpus:
            return cls(gpus, _local_world_size(), gpus,
                       f"the {gpus} GPU(s) visible here; under torchrun it is --nproc-per-node x nodes: --world-size N")
        layout = max(cfg.model.tp, 1) * max(cfg.model.pp, 1)
        return cls(layout, _local_world_size(), gpus, "no GPU here: model.tp x model.pp, the smallest world the "
                                                      "layout runs on; --world-size N for another")

    def rollout_engine(self, cfg: Any) -> str | None:
        """The rollout engine the run builds (`rollout.engine=auto`: SGLang where there is a GPU); None when
        this world is not this machine's (the rules ask torch)."""
        if cfg.rollout.engine != "auto":
            return cfg.rollout.engine
        return None if self.devices is None else ("sglang" if self.devices else "hf")


def _local_world_size() -> int | None:
    return int(os.environ["LOCAL_WORLD_SIZE"]) if os.environ.get("LOCAL_WORLD_SIZE") else None


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_check(world: World) -> CheckResult:
    """One GPU per process: each rank drives the GPU of its LOCAL_RANK (`parallel.groups.init_distributed`), so
    a node cannot start more processes than it shows GPUs. Checked where both counts are known."""
    r = CheckResult()
    if world.devices and world.gpus_per_node and world.gpus_per_node > world.devices:
        r.errors.append(f"{world.gpus_per_node} processes per node (LOCAL_WORLD_SIZE) but {world.devices} GPU(s) "
                        f"visible here: each process drives its own GPU; start at most {world.devices} per node")
    return r


def startup_checks(cfg: Any, command: str, world: World, inputs: bool = True) -> CheckResult:
    """Every start-up rule of `command` on `world`, failed (`errors`) or worth a note (`notes`): the layout,
    batch and length rules, one GPU per process, and with `inputs` every input path the command opens. Changes
    nothing; the real run and `--dry-run` both stop on its errors (`raise_failed`)."""
    r = run_checks(cfg, world.size, command, world.gpus_per_node, rollout_engine=world.rollout_engine(cfg))
    r.extend(device_check(world))
    if inputs:
        r.extend(check_inputs(cfg, command))
    return r


def check_startup(cfg: Any, world_size: int | None = None, command: str = "train",
                  gpus_per_node: int | None = None) -> CheckResult:
    """The rules of `command` (not its input paths) on `world_size` processes, `gpus_per_node` per node (the
    launcher's world when None); raise StartupCheckError naming each failure, else return the notes."""
    world = World.of_launcher() if world_size is None else World(world_size, gpus_per_node)
    r = startup_checks(cfg, command, world, inputs=False)
    raise_failed(r, command, world)
    return r


def raise_failed(r: CheckResult, command: str, world: World) -> None:
    """StartupCheckError for every failed rule of `r` (one failure: one line; several: one line each under a
    heading); nothing when all passed. Where the world size came from is named when a rule about it failed."""
    if not r.errors:
        return
    layout = any("world size" in e for e in r.errors)
    source = f" ({world.source})" if layout and world.source else ""
    if len(r.errors) == 1:  # one failure: one line, as every other error of the CLI
        raise StartupCheckError(f"start-up check failed for `pebr {command}` on {world.size} GPU(s){source}: "
                                f"{r.errors[0]}")
    lines = "\n".join(f"  - {e}" for e in r.errors)
    raise StartupCheckError(f"{len(r.errors)} start-up check(s) failed for `pebr {command}` on {world.size} GPU(s)"
                            f"{source}:\n{lines}")
