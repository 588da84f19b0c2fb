"""Sequence packing: variable-length samples -> micro-batches without padding.

A micro-batch is one packed row of `S = sum(L_i)` tokens: the samples' ids concatenated, their M-RoPE
positions computed per sample (so they restart at 0 for each), their images concatenated in order, and
`cu_seqlens` marking the boundaries for the attention (each sample attends only to itself, causally).

Losses are computed on a *target* layout `[n, T]`: row i holds the trained target tokens of sample i
(the response for GRPO, the assistant turns for SFT), left-aligned, with `target_pos` the packed-row index
of the logit that predicts each target (the token before it) and `target_mask` 1 where a target exists.
Per-token training inputs (old/reference log-probs, advantages) live in the same `[n, T]` layout, so the
loss sees exactly the `[B, T]` tensors the GRPO math is written for, whatever the packing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor


@dataclass
class ActorSequence:
    """One training sequence: tokens, which of them are targets, its images and per-target inputs."""

    input_ids: list[int]
    target_mask: list[int]  # 1 where input_ids[j] is a trained target (j >= 1)
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    advantage: float = 0.0  # broadcast to every target token (GRPO)
    old_logprobs: Tensor | None = None  # [num_targets]
    ref_logprobs: Tensor | None = None  # [num_targets]
    index: int = 0  # position in the caller's list, so results can be put back in order

    def __post_init__(self) -> None:
        if len(self.target_mask) != len(self.input_ids):
            raise ValueError(f"sequence {self.index}: target_mask has {len(self.target_mask)} entries for "
                             f"{len(self.input_ids)} tokens")
        if self.target_mask and self.target_mask[0]:
            raise ValueError(f"sequence {self.index}: the first token cannot be a target (nothing predicts it)")

    @property
    def num_targets(self) -> int:
        """How many target tokens the sequence has."""
        return int(sum(self.target_mask))


@dataclass
class MicroBatch:
    """A packed row and the `[n, T]` target layout of its samples."""

    input_ids: Tensor  # [1, S]
    position_ids: Tensor  # [3, 1, S]
    cu_seqlens: Tensor  # [n + 1] int32
    max_seqlen: int
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None
    target_ids: Tensor  # [n, T] long (0 where masked)
    target_pos: Tensor  # [n, T] long, packed-row index of the predicting logit (0 where masked)
    target_mask: Tensor  # [n, T] float
    advantages: Tensor  # [n, T] float
    old_logprobs: Tensor | None  # [n, T]
    ref_logprobs: Tensor | None  # [n, T]
    indices: list[int] = field(default_factory=list)  # ActorSequence.index of each row

    @property
    def num_tokens(self) -> int:
        """Tokens in the packed row."""
        return int(self.input_ids.shape[1])


def plan_micro_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sequence indices into micro-batches of at most `max_tokens` tokens, keeping their order.

    A sequence longer than `max_tokens` gets a micro-batch of its own (it is never split or dropped).
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if cur and used + n > max_tokens:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


PositionFn = Callable[[list[int], Tensor | None], Tensor]  # (ids, image_grid_thw) -> [3, L]


def _per_target(seqs: Sequence[ActorSequence], width: int, getter) -> Tensor | None:
    values = [getter(s) for s in seqs]
    if all(v is None for v in values):
        return None
    out = torch.zeros(len(seqs), width, dtype=torch.float32)
    for i, (s, v) in enumerate(zip(seqs, values)):
        if v is None:
            raise ValueError(f"sequence {s.index} lacks per-target values that others in its micro-batch have")
        if v.numel() != s.num_targets:
            raise ValueError(f"sequence {s.index}: {v.numel()} per-target values for {s.num_targets} targets")
        out[i, : s.num_targets] = v.float().flatten()
    return out


def pack(seqs: Sequence[ActorSequence], positions: PositionFn) -> MicroBatch:
    """Pack `seqs` into one micro-batch."""
    ids: list[int] = []
    pos_parts, pix, grids = [], [], []
    cu = [0]
    width = max(1, max(s.num_targets for s in seqs))
    n = len(seqs)
    target_ids = torch.zeros(n, width, dtype=torch.long)
    target_pos = torch.zeros(n, width, dtype=torch.long)
    target_mask = torch.zeros(n, width, dtype=torch.float32)
    advantages = torch.zeros(n, width, dtype=torch.float32)
    for row, s in enumerate(seqs):
        start = len(ids)
        tgt = [j for j, m in enumerate(s.target_mask) if m]
        target_ids[row, : len(tgt)] = torch.tensor([s.input_ids[j] for j in tgt], dtype=torch.long)
        target_pos[row, : len(tgt)] = torch.tensor([start + j - 1 for j in tgt], dtype=torch.long)
        target_mask[row, : len(tgt)] = 1.0
        advantages[row, : len(tgt)] = s.advantage
        ids.extend(s.input_ids)
        cu.append(len(ids))
        pos_parts.append(positions(s.input_ids, s.image_grid_thw))
        if s.pixel_values is not None:
            pix.append(s.pixel_values)
            grids.append(s.image_grid_thw)
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.cat(pos_parts, dim=1)[:, None, :],
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(len(s.input_ids) for s in seqs),
        pixel_values=torch.cat(pix) if pix else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        target_ids=target_ids,
        target_pos=target_pos,
        target_mask=target_mask,
        advantages=advantages,
        old_logprobs=_per_target(seqs, width, lambda s: s.old_logprobs),
        ref_logprobs=_per_target(seqs, width, lambda s: s.ref_logprobs),
        indices=[s.index for s in seqs],
    )


def pack_micro_batches(seqs: Sequence[ActorSequence], max_tokens: int, positions: PositionFn) -> list[MicroBatch]:
    """Pack `seqs` in order into micro-batches of at most `max_tokens` tokens each."""
    plan = plan_micro_batches([len(s.input_ids) for s in seqs], max_tokens)
    return [pack([seqs[i] for i in group], positions) for group in plan]
