"""Process groups: torch.distributed plus Megatron's tensor/pipeline/data-parallel groups, on GPU or CPU.

`init_parallel(tp, pp)` is the one entry point. It reads the usual launcher environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), picks NCCL with CUDA and gloo without, builds Megatron's groups and
seeds Megatron's RNG streams, inside the scoped CPU compatibility layer when CUDA is absent; called again
with the same layout it keeps the groups and only reseeds. `destroy_parallel()` undoes the Megatron part so a
process can re-initialise with another TP/PP (the tests reuse two workers for several layouts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pebr_mega.parallel.cpu_compat import megatron_on_cpu, seed_model_parallel_rng
from pebr_mega.parallel.launch import free_port


@dataclass(frozen=True)
class ParallelState:
    """Where this rank sits: its global rank and its TP / PP / DP coordinates."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def init_distributed(backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Initialise torch.distributed from the environment (a single-rank world when no launcher set it)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"), timeout=timedelta(minutes=timeout_minutes))


@megatron_on_cpu
def init_parallel(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None) -> ParallelState:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups for (tp, pp)."""
    from megatron.core import parallel_state as mpu

    init_distributed(backend)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {tp}*{pp}")
    if not _layout_is(tp, pp):
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        mpu.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_model_parallel_rng(seed)
    return current_state()


def _layout_is(tp: int, pp: int) -> bool:
    """Whether Megatron's groups already exist for (tp, pp) in this world.

    The pipeline runs its stages one after another in one process with the same layout: their groups are
    kept instead of rebuilt. Megatron's `destroy_model_parallel` only drops its references, so every rebuild
    would leave ~20 more process groups registered with torch.distributed, each with its own gloo threads
    (a demo reached 171 threads by stage 2), and NCCL communicators on GPU.
    """
    from megatron.core import parallel_state as mpu

    return (mpu.model_parallel_is_initialized() and mpu.get_tensor_model_parallel_world_size() == tp
            and mpu.get_pipeline_model_parallel_world_size() == pp)


def current_state() -> ParallelState:
    """This rank's coordinates in the current Megatron layout."""
    from megatron.core import parallel_state as mpu

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelState(
        rank=dist.get_rank(), world_size=dist.get_world_size(),
        tp=mpu.get_tensor_model_parallel_world_size(), pp=mpu.get_pipeline_model_parallel_world_size(),
        dp=mpu.get_data_parallel_world_size(), tp_rank=mpu.get_tensor_model_parallel_rank(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(), dp_rank=mpu.get_data_parallel_rank(), device=device,
    )


def rank() -> int:
    """This process's global rank (0 outside a distributed job)."""
    return dist.get_rank() if dist.is_initialized() else 0


def launch_rank() -> int:
    """This process's global rank, also before the process group exists (the launcher's RANK)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank of the job (`obj` itself outside one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank of the job (nothing to wait for outside a distributed job)."""
    if dist.is_initialized():
        dist.barrier()


def destroy_parallel(process_group: bool = False) -> None:
    """Tear down Megatron's groups (and the default process group when `process_group`)."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if process_group and dist.is_initialized():
        dist.destroy_process_group()


def is_main_rank() -> bool:
    """Whether this process is the job's rank 0, the one that prints and writes the run's shared files; also
    before the process group exists (the launcher's RANK), so every rank-0 test gives one answer."""
    return launch_rank() == 0
