"""The one owner of the rollout engine's lifecycle: memory, weights and the order of both.

The engine contract (`pebr_mega.rollout.engine.RolloutEngine`) says the weights are gone after
`release_memory()`. `EngineLifecycle.rollout_phase()` is the only code that moves the engine's memory, and it
always runs the same sequence:

    free the allocator cache          (the training step's peak, cached by torch, goes back to the driver)
    resume the weight memory          (contents undefined)
    sync the weights from the source  (the actor: Megatron shards -> HF tensors -> buckets)
    free the allocator cache          (torch.cuda.empty_cache(): the gather/bucket buffers go back to the driver)
    resume the KV cache               (SGLang sizes nothing here, but it must find the memory free)
    generate                          (the body of the `with`)
    release every tag                 (training gets the memory back; the weights are gone again)

The first free is slime's order (THUDM/slime train.py at 624b824a8: `offload_train()` calls
`actor_model.clear_memory()` before `rollout_manager.onload_weights`): resuming the weights maps their memory again through torch_memory_saver, outside
torch's caching allocator, so the blocks the actor's forward/backward left cached must be returned first or
the resume can fail with the GPU "full" of free-but-cached memory. `close()` shuts the engine down at the
end of a stage (the pipeline runs the next stage's engine in the same process).

How it knows whether the engine's weights are valid: they are valid after construction (the engine loaded
them from disk) and after a sync, and invalid after every release. With a weight source attached (the
trainers: the actor), every phase syncs, because the actor is the truth and the previous phase's release
wiped the engine's copy. Without one (difficulty sampling: no actor), a phase can only run while the weights
loaded at construction are still valid, i.e. before the first release; a phase after that is an error
naming the cause instead of a rollout on uninitialised memory.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from pebr_mega.actor.megatron_actor import MegatronActor
from pebr_mega.checkpoint.hf_mapping import HFMapping
from pebr_mega.errors import PebrError
from pebr_mega.rollout.engine import WEIGHTS, RolloutEngine
from pebr_mega.rollout.weight_sync import sync_weights

# Pushes fresh weights into the engine (collective over the training ranks); returns sync metrics.
WeightSource = Callable[[RolloutEngine], dict[str, float]]


def actor_weights(actor: MegatronActor, bucket_mb: int) -> WeightSource:
    """The weight source of a trainer: the actor's current weights, gathered and sent in buckets."""
    mapping = HFMapping(actor.arch)

    def push(engine: RolloutEngine) -> dict[str, float]:
        return sync_weights(actor.module, mapping, engine, bucket_mb).metrics()

    return push


def free_allocator_cache() -> None:
    """Return the caching allocator's free blocks to the driver (CUDA), so the engine can take them."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class EngineLifecycle:
    """Owns one rollout engine: `release()` once after construction (trainers), then `rollout_phase()` only."""

    def __init__(self, engine: RolloutEngine, source: WeightSource | None = None) -> None:
        self.engine = engine
        self.source = source
        self.weights_valid = True  # the engine loaded its weights from disk when it was built
        self.last_sync: dict[str, float] = {}
        self.closed = False

    def attach(self, source: WeightSource) -> None:
        """Sync from `source` (the actor) at the start of every phase from now on."""
        self.source = source

    def release(self) -> None:
        """Give all of the engine's memory back (before the actor and the reference allocate theirs).

        SGLang sizes its KV pool from the free memory when it starts, so trainers build the engine first and
        release it here; the weights are gone afterwards and the first phase syncs them.
        """
        self.engine.release_memory()
        self.weights_valid = False

    @contextmanager
    def rollout_phase(self) -> Iterator[RolloutEngine]:
        """Resume weights -> sync -> free the allocator cache -> resume the KV cache; yield; release.

        `last_sync` holds the sync's metrics ({} when the phase used the weights loaded at construction).
        """
        if self.closed:
            raise PebrError("rollout_phase() after the rollout engine was shut down (EngineLifecycle.close)")
        if self.source is None and not self.weights_valid:
            raise PebrError("the rollout engine's weights were released and there is no weight source to sync "
                            "them from: attach the actor (EngineLifecycle.attach) or keep one phase open")
        try:
            free_allocator_cache()  # before the weights come back (see the module docstring)
            self.engine.resume_memory([WEIGHTS])
            self.last_sync = {}
            if self.source is not None:
                self.last_sync = self.source(self.engine)
                self.weights_valid = True
            free_allocator_cache()
            self.engine.resume_memory()
            yield self.engine
        finally:
            self.engine.release_memory()
            self.weights_valid = False

    def close(self) -> None:
        """Shut the engine down (its processes and all its GPU memory) and return the cache; idempotent.

        A stage calls it when it ends, also on error: the pipeline's next stage builds a new engine in this
        process, and SGLang sizes that engine's KV pool from the memory free when it starts.
        """
        if self.closed:
            return
        self.closed = True
        self.source = None  # drops the actor closure, so the actor can be collected with the stage
        self.engine.shutdown()
        free_allocator_cache()
