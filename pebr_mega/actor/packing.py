"""Sequence packing: variable-length samples -> balanced, padded micro-batches.

Planning (`plan_micro_batches`). Every rank is given the same list of sequences. The plan splits them over
the data-parallel ranks and then into micro-batches by a token budget with a balancing rule (largest
first into the least-loaded bin, the LPT rule): first over the ranks, so each rank gets near-equal tokens;
then each rank's share into M micro-batches, where M is the smallest count that keeps every micro-batch
within `max_tokens` on the rank that needs the most, and is then used on EVERY rank. Equal micro-batch
counts matter beyond balance: every collective a micro-batch runs (the pipeline's sends and receives, and
with FP8 the amax all-reduce of Transformer Engine's delayed scaling over TP x DP) must be matched on
every rank, or the ranks deadlock. A rank with fewer sequences than M gets empty micro-batches (padding
only, no targets). A sequence longer than `max_tokens` gets a micro-batch of its own (never split or
dropped). The plan is a pure function of the lengths, so all ranks agree without communicating.

A micro-batch is one packed row: the samples' ids concatenated, their M-RoPE positions computed per
sample (so they restart for each), their images concatenated in order, then ONE trailing padding segment
that brings the row to a multiple of `pebr_mega.models.packing.token_multiple` (16 for FP8 GEMMs, x TP
under sequence parallelism). The padding is a segment of its own for attention (it attends to itself
only, and nothing attends to it), has positions 0, 1, ... of its own, and holds no target, so it changes
no log-prob, loss or gradient. This is the one place where micro-batches are padded.

Losses are computed on a *target* layout `[n, T]`: row i holds the trained target tokens of sample i
(the response for GRPO, the assistant turns for SFT), left-aligned, with `target_mask` 1 where a target
exists. The model only produces the final hidden states of the positions that predict a target
(`target_index`, the packed-row index of the token before each target, in row-major order of the layout);
the per-target log-probs are then scattered into the layout with `target_slot`. Per-token training inputs
(old/reference log-probs, advantages) live in the same layout, so the loss sees exactly the `[B, T]`
tensors the GRPO math is written for, whatever the packing.
"""
from __future__ import annotations

import heapq
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
    rollout_logprobs: Tensor | None = None  # [num_targets], the engine's (train-inference mismatch)
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
    """A packed, padded row and the `[n, T]` target layout of its samples."""

    input_ids: Tensor  # [1, S], S a multiple of the token multiple
    position_ids: Tensor  # [3, 1, S]
    lengths: list[int]  # segment lengths: every sample, then the padding segment (if any)
    pad: int  # tokens of the trailing padding segment
    pixel_values: Tensor | None
    image_grid_thw: Tensor | None  # kept on the host (metadata the vision tower plans from)
    target_ids: Tensor  # [n, T] long (0 where masked)
    target_mask: Tensor  # [n, T] float
    target_index: Tensor  # [N] long, packed-row index of the position predicting each target (row-major)
    target_slot: Tensor  # [N] long, flat index of each target in the [n, T] layout
    advantages: Tensor  # [n, T] float
    old_logprobs: Tensor | None  # [n, T]
    ref_logprobs: Tensor | None  # [n, T]
    rollout_logprobs: Tensor | None = None  # [n, T], 0 where the engine gave none
    rollout_mask: Tensor | None = None  # [n, T] float: targets with the engine's log-prob
    indices: list[int] = field(default_factory=list)  # ActorSequence.index of each row

    @property
    def num_tokens(self) -> int:
        """Tokens in the packed row, padding included."""
        return int(self.input_ids.shape[1])

    @property
    def num_targets(self) -> int:
        """Target tokens in the micro-batch."""
        return int(self.target_index.numel())

    @property
    def flat_target_ids(self) -> Tensor:
        """The target token ids [N], in the order of `target_index`."""
        return self.target_ids.reshape(-1)[self.target_slot]

    def to_layout(self, values: Tensor) -> Tensor:
        """Per-target values [N] (order of `target_index`) -> the `[n, T]` layout, 0 where no target."""
        n, width = self.target_mask.shape
        flat = values.new_zeros(n * width).index_copy(0, self.target_slot.to(values.device), values)
        return flat.view(n, width)


def _lpt(items: Sequence[int], weights: Sequence[int], bins: int) -> list[list[int]]:
    """Largest first into the least-loaded bin (ties: lower bin index); items sorted within each bin."""
    heap = [(0, b) for b in range(bins)]
    out: list[list[int]] = [[] for _ in range(bins)]
    for i in sorted(items, key=lambda j: (-weights[j], j)):
        load, b = heapq.heappop(heap)
        out[b].append(i)
        heapq.heappush(heap, (load + weights[i], b))
    return [sorted(g) for g in out]


def _fits(groups: list[list[int]], lengths: Sequence[int], max_tokens: int) -> bool:
    return all(len(g) <= 1 or sum(lengths[i] for i in g) <= max_tokens for g in groups)


def plan_micro_batches(lengths: Sequence[int], max_tokens: int, dp_size: int = 1) -> list[list[list[int]]]:
    """Sequence indices per data-parallel rank, per micro-batch (see the module docstring).

    Returns `plan[rank][m]` = sorted indices of micro-batch m on that rank; every rank has the same number
    of micro-batches (some possibly empty); each micro-batch holds at most `max_tokens` tokens unless it
    is a single longer sequence. No sequences -> no micro-batches anywhere.
    """
    if max_tokens < 1 or dp_size < 1:
        raise ValueError(f"max_tokens={max_tokens} and dp_size={dp_size} must be >= 1")
    n = len(lengths)
    if n == 0:
        return [[] for _ in range(dp_size)]
    shares = _lpt(range(n), lengths, dp_size)
    count = 1
    for share in shares:  # the fewest micro-batches that fit this rank's share
        m = max(1, -(-sum(lengths[i] for i in share) // max_tokens))
        while m < len(share) and not _fits(_lpt(share, lengths, m), lengths, max_tokens):
            m += 1
        count = max(count, min(m, max(len(share), 1)))
    while True:  # the same count on every rank; LPT with more bins can (rarely) fit worse, so re-check
        plan = [[g for g in sorted(_lpt(share, lengths, count), key=lambda g: -sum(lengths[i] for i in g))]
                for share in shares]
        if all(_fits(p, lengths, max_tokens) for p in plan):
            return plan
        count += 1


PositionFn = Callable[[list[int], Tensor | None], Tensor]  # (ids, image_grid_thw) -> [3, L]


def _per_target(seqs: Sequence[ActorSequence], width: int, getter, required: bool = True
                ) -> tuple[Tensor | None, Tensor | None]:
    """Per-target values [n, width] of `seqs` (0 past each sequence's targets) and the mask of the targets that
    have one; (None, None) when no sequence has any. `required`: a sequence without values, where others have
    them, is an error (old / reference log-probs); otherwise it is masked out (the engine's log-probs)."""
    if all(getter(s) is None for s in seqs):
        return None, None
    values = torch.zeros(len(seqs), width, dtype=torch.float32)
    mask = torch.zeros(len(seqs), width, dtype=torch.float32)
    for i, s in enumerate(seqs):
        v = getter(s)
        if v is None and required:
            raise ValueError(f"sequence {s.index} lacks per-target values that others in its micro-batch have")
        if v is None or (v.numel() == 0 and not required):
            continue
        if v.numel() != s.num_targets:
            raise ValueError(f"sequence {s.index}: {v.numel()} per-target values for {s.num_targets} targets")
        values[i, : s.num_targets] = v.float().flatten()
        mask[i, : s.num_targets] = 1.0
    return values, mask


def pack(seqs: Sequence[ActorSequence], positions: PositionFn, multiple: int = 1, pad_token_id: int = 0) -> MicroBatch:
    """Pack `seqs` into one micro-batch padded to a multiple of `multiple` tokens (no `seqs`: padding only)."""
    ids: list[int] = []
    pos_parts, pix, grids = [], [], []
    width = max([1] + [s.num_targets for s in seqs])
    n = len(seqs)
    target_ids = torch.zeros(n, width, dtype=torch.long)
    target_mask = torch.zeros(n, width, dtype=torch.float32)
    advantages = torch.zeros(n, width, dtype=torch.float32)
    index, slot = [], []
    for row, s in enumerate(seqs):
        start = len(ids)
        tgt = [j for j, m in enumerate(s.target_mask) if m]
        target_ids[row, : len(tgt)] = torch.tensor([s.input_ids[j] for j in tgt], dtype=torch.long)
        target_mask[row, : len(tgt)] = 1.0
        advantages[row, : len(tgt)] = s.advantage
        index.extend(start + j - 1 for j in tgt)
        slot.extend(row * width + c for c in range(len(tgt)))
        ids.extend(s.input_ids)
        pos_parts.append(positions(s.input_ids, s.image_grid_thw))
        if s.pixel_values is not None:
            pix.append(s.pixel_values)
            grids.append(s.image_grid_thw)
    lengths = [len(s.input_ids) for s in seqs]
    pad = pad_tokens(len(ids), multiple)
    if pad:
        ids.extend([pad_token_id] * pad)
        pos_parts.append(torch.arange(pad).expand(3, -1))
        lengths.append(pad)
    rollout, rollout_mask = _per_target(seqs, width, lambda s: s.rollout_logprobs, required=False)
    return MicroBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.cat(pos_parts, dim=1)[:, None, :],
        lengths=lengths,
        pad=pad,
        pixel_values=torch.cat(pix) if pix else None,
        image_grid_thw=torch.cat(grids) if grids else None,
        target_ids=target_ids,
        target_mask=target_mask,
        target_index=torch.tensor(index, dtype=torch.long),
        target_slot=torch.tensor(slot, dtype=torch.long),
        advantages=advantages,
        old_logprobs=_per_target(seqs, width, lambda s: s.old_logprobs)[0],
        ref_logprobs=_per_target(seqs, width, lambda s: s.ref_logprobs)[0],
        rollout_logprobs=rollout,
        rollout_mask=rollout_mask,
        indices=[s.index for s in seqs],
    )


def pad_tokens(real: int, multiple: int) -> int:
    """The padding `pack` appends to a micro-batch of `real` tokens: up to the next multiple, and one whole
    `multiple` for an empty micro-batch (it still runs the forward, so it needs a row)."""
    return (-real) % multiple if real else multiple


def pack_micro_batches(seqs: Sequence[ActorSequence], max_tokens: int, positions: PositionFn, dp_size: int = 1,
                       dp_rank: int = 0, multiple: int = 1, pad_token_id: int = 0,
                       plan: list[list[list[int]]] | None = None) -> list[MicroBatch]:
    """This data-parallel rank's micro-batches of `seqs` under `plan` (default: `plan_micro_batches` over all
    ranks, which every rank computes alike)."""
    if plan is None:
        plan = plan_micro_batches([len(s.input_ids) for s in seqs], max_tokens, dp_size)
    return [pack([seqs[i] for i in group], positions, multiple, pad_token_id) for group in plan[dp_rank]]


def plan_stats(plan: list[list[list[int]]], lengths: Sequence[int], multiple: int) -> dict[str, float]:
    """Token counts of every micro-batch of a plan, padded as `pack` pads them: min, max, padding fraction."""
    sizes, pads = [], 0
    for rank in plan:
        for group in rank:
            real = sum(lengths[i] for i in group)
            pad = pad_tokens(real, multiple)
            sizes.append(real + pad)
            pads += pad
    if not sizes:
        return {}
    return {"microbatch_tokens_min": float(min(sizes)), "microbatch_tokens_max": float(max(sizes)),
            "padding_fraction": pads / sum(sizes)}
