"""Deterministic, resumable data order: which records each step trains on.

The order is the one upstream's dataloader yields (EasyR1 0.3.2, `verl/trainer/ray_trainer.py`,
`RayPPOTrainer._create_dataloader`, later moved to `verl/trainer/data_loader.py`: torch's `RandomSampler` with
one `torch.Generator` seeded once with `data.seed`, batched by torchdata's `StatefulDataLoader`, whose
stateful sampler wrapper yields the parent `RandomSampler.__iter__` unchanged). Each
pass over that sampler draws two permutations from the generator: the pass's order, then an empty tail
(`RandomSampler.__iter__` takes `randperm(n)[:num_samples % n]` once the whole permutations are yielded,
and a finished epoch runs the sampler to its end). So epoch e's order is the generator's (2e + 1)-th
permutation: every epoch sees a fresh one, and it is recomputed from the position alone: resuming needs only
(epoch, offset), saved in the trainer state. `tests/trainer/test_trainer_state.py` compares it with torch's own
`DataLoader(RandomSampler(generator=...), drop_last=...)`.

`drop_last`: the RL stages drop an epoch's last partial batch (upstream's `drop_last=True`), so an epoch is
floor(records / batch) steps and each step has a full rollout batch; SFT keeps it, as the HF Trainer that
LLaMA-Factory runs does (`dataloader_drop_last` is off by default): that last batch is simply smaller.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class DataPosition:
    """Where the data order stands: the epoch and the offset of the next record in that epoch."""

    epoch: int = 0
    offset: int = 0

    def state_dict(self) -> dict:
        """A JSON-friendly copy."""
        return asdict(self)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The record indices of `epoch` as torch's `RandomSampler` with a generator seeded once with `seed` yields
    them in its (epoch + 1)-th pass (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(2 * epoch):  # each earlier pass: its permutation and the empty tail
        torch.randperm(n, generator=g)
    return torch.randperm(n, generator=g).tolist()


class EpochSampler:
    """Yields batches of records in a seeded, per-epoch shuffled order; resumable from a `DataPosition`."""

    def __init__(self, records: Sequence[T], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not records:
            raise ValueError("no records to sample from")
        if drop_last and len(records) < batch_size:
            raise ValueError(f"{len(records)} records make no full batch of {batch_size} (the last partial batch "
                             f"is dropped)")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.position = DataPosition()
        self._order: tuple[int, list[int]] | None = None  # (epoch, its order): computed once per epoch

    def order(self, epoch: int) -> list[int]:
        """The record indices of `epoch`, in training order."""
        if not self.shuffle:
            return list(range(len(self.records)))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.records), self.seed, epoch))
        return self._order[1]

    def steps_per_epoch(self) -> int:
        """Batches per epoch: floor when dropping the last partial batch, else ceil."""
        n, b = len(self.records), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def dropped_per_epoch(self) -> int:
        """Records an epoch leaves out (the partial batch dropped; 0 when it is kept)."""
        return len(self.records) % self.batch_size if self.drop_last else 0

    def next_batch(self) -> tuple[int, list[T]]:
        """The next (epoch, batch) and advance the position (rolling into the next epoch as needed)."""
        epoch, start = self.position.epoch, self.position.offset
        usable = len(self.records) - self.dropped_per_epoch()
        if start >= usable:  # a position saved by an older run, or at the very end of an epoch
            epoch, start = epoch + 1, 0
        end = min(start + self.batch_size, usable)
        batch = [self.records[i] for i in self.order(epoch)[start:end]]
        self.position = DataPosition(epoch, end) if end < usable else DataPosition(epoch + 1, 0)
        return epoch, batch

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved with `position.state_dict()`."""
        self.position = DataPosition(**state)
