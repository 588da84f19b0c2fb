"""Deterministic, resumable data order: which records each step trains on.

The order of epoch e is a permutation drawn from `seed + e`, so it can be recomputed from the position
alone: resuming needs only (epoch, offset), saved in the trainer state, to continue exactly where an
uninterrupted run would have been. The last partial batch of an epoch is kept (upstream drops it: a
known defect), padded by nothing: it is simply smaller.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence, TypeVar

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


class EpochSampler:
    """Yields batches of records in a seeded, per-epoch shuffled order; resumable from a `DataPosition`."""

    def __init__(self, records: Sequence[T], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not records:
            raise ValueError("no records to sample from")
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.position = DataPosition()

    def order(self, epoch: int) -> list[int]:
        """The record indices of `epoch`, in training order."""
        if not self.shuffle:
            return list(range(len(self.records)))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.records), generator=g).tolist()

    def steps_per_epoch(self) -> int:
        """Batches per epoch: floor when dropping the last partial batch, else ceil."""
        n, b = len(self.records), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def next_batch(self) -> tuple[int, list[T]]:
        """The next (epoch, batch) and advance the position (rolling into the next epoch as needed)."""
        order = self.order(self.position.epoch)
        start = self.position.offset
        end = min(start + self.batch_size, len(order))
        if start >= len(order) or (self.drop_last and end - start < self.batch_size):
            self.position = DataPosition(self.position.epoch + 1, 0)
            return self.next_batch()
        epoch = self.position.epoch
        self.position = DataPosition(epoch, end) if end < len(order) else DataPosition(epoch + 1, 0)
        return epoch, [self.records[i] for i in order[start:end]]

    def batches(self, num_steps: int) -> Iterator[tuple[int, list[T]]]:
        """`num_steps` successive batches."""
        for _ in range(num_steps):
            yield self.next_batch()

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved with `position.state_dict()`."""
        self.position = DataPosition(**state)
