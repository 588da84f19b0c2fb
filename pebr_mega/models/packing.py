"""Sequence packing: variable-length samples in one row without padding (Megatron's THD format).

The samples are concatenated into input_ids [1, T]; `PackedSeqParams(qkv_format="thd")` carries the sample
boundaries (`cu_seqlens`), so attention stays inside each sample (the `torch` spec attends sample by
sample, TE uses its varlen kernels); M-RoPE positions are computed per sample and so restart at 0 for every
sample; images are concatenated in sample order, which is the order in which their `<|image_pad|>` tokens
appear in the packed row. Per-token outputs ([1, T] losses, log-probs, logits) are split back with
`PackedBatch.unpack`. With packing, every token's log-prob equals the padded computation's (tested).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from pebr_mega.models.arch import QwenVLArch
from pebr_mega.models.rope_index import get_rope_index


@dataclass
class PackedBatch:
    """One packed row and what `Qwen25VLModel.forward` needs to run it."""

    input_ids: Tensor  # [1, T]
    position_ids: Tensor  # [3, 1, T]
    packed_seq_params: object  # megatron.core.packed_seq_params.PackedSeqParams
    lengths: list[int]  # per sample, without the trailing pad segment
    pixel_values: Tensor | None = None
    image_grid_thw: Tensor | None = None
    labels: Tensor | None = None  # [1, T]
    pad: int = 0  # tokens of the trailing pad segment (to reach a multiple of `pad_to_multiple`)
    extra: dict = field(default_factory=dict)

    def model_inputs(self, with_labels: bool = False) -> dict:
        """Keyword arguments for `Qwen25VLModel.forward`."""
        out = {"input_ids": self.input_ids, "position_ids": self.position_ids,
               "packed_seq_params": self.packed_seq_params, "pixel_values": self.pixel_values,
               "image_grid_thw": self.image_grid_thw}
        if with_labels:
            out["labels"] = self.labels
        return out

    def unpack(self, per_token: Tensor) -> list[Tensor]:
        """Split a per-token tensor [1, T, ...] or [T, ...] back into one tensor per sample."""
        x = per_token[0] if per_token.dim() >= 2 and per_token.shape[0] == 1 and per_token.shape[1] == self.total else per_token
        return list(torch.split(x[: sum(self.lengths)], self.lengths, dim=0))

    @property
    def total(self) -> int:
        return int(self.input_ids.shape[1])


def pack_sequences(arch: QwenVLArch, input_ids: Sequence[Tensor], pixel_values: Sequence[Tensor | None] | None = None,
                   image_grid_thw: Sequence[Tensor | None] | None = None, labels: Sequence[Tensor] | None = None,
                   pad_to_multiple: int = 1, pad_token_id: int = 0) -> PackedBatch:
    """Pack 1-D token tensors (with each sample's own pixel_values / image grids) into one THD row.

    `pad_to_multiple` appends one extra segment of `pad_token_id` (its own sample in `cu_seqlens`, label -100)
    so T divides e.g. the TP size; it is excluded from `lengths` and `unpack`.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    n = len(input_ids)
    pixel_values = list(pixel_values) if pixel_values is not None else [None] * n
    image_grid_thw = list(image_grid_thw) if image_grid_thw is not None else [None] * n
    ids, pos, labs, pix, grids, lengths = [], [], [], [], [], []
    for i, row in enumerate(input_ids):
        row = torch.as_tensor(row).reshape(-1)
        grid = image_grid_thw[i]
        p, _ = get_rope_index(row[None], grid, image_token_id=arch.image_token_id, video_token_id=arch.video_token_id,
                              spatial_merge_size=arch.vision.spatial_merge_size,
                              tokens_per_second=arch.vision.tokens_per_second)
        ids.append(row)
        pos.append(p[:, 0])
        lengths.append(row.numel())
        if labels is not None:
            labs.append(torch.as_tensor(labels[i]).reshape(-1))
        if grid is not None and len(grid):
            pix.append(pixel_values[i])
            grids.append(grid)
    total = sum(lengths)
    pad = (-total) % pad_to_multiple
    if pad:
        ids.append(torch.full((pad,), pad_token_id, dtype=ids[0].dtype))
        pos.append(torch.arange(pad).expand(3, -1))
        if labels is not None:
            labs.append(torch.full((pad,), -100, dtype=labs[0].dtype))
    seg = lengths + ([pad] if pad else [])
    cu = torch.tensor([0] + seg).cumsum(0).to(torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(seg), max_seqlen_kv=max(seg))
    return PackedBatch(
        input_ids=torch.cat(ids)[None], position_ids=torch.cat(pos, dim=1)[:, None, :], packed_seq_params=params,
        lengths=lengths, pixel_values=torch.cat(pix) if pix else None, image_grid_thw=torch.cat(grids) if grids else None,
        labels=torch.cat(labs)[None] if labels is not None else None, pad=pad,
    )


def packed_to_device(batch: PackedBatch, device: torch.device | str) -> PackedBatch:
    """The same batch with every tensor (cu_seqlens included) on `device`."""
    from megatron.core.packed_seq_params import PackedSeqParams

    p = batch.packed_seq_params
    cu = p.cu_seqlens_q.to(device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=p.max_seqlen_q, max_seqlen_kv=p.max_seqlen_kv)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return PackedBatch(move(batch.input_ids), move(batch.position_ids), params, batch.lengths, move(batch.pixel_values),
                       move(batch.image_grid_thw), move(batch.labels), batch.pad, batch.extra)
