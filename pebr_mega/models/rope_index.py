"""3-D (temporal, height, width) M-RoPE position ids for Qwen2.5-VL sequences.

Text tokens advance all three coordinates together by 1 per token. A run of image tokens for an image of
(t, h, w) patches covers t x (h/m) x (w/m) merged tokens; token (i, j, k) of that grid gets position
(start + i * interval, start + j, start + k), with `start` the next text position, interval 1 for images and
`tokens_per_second * seconds_per_grid` (truncated to an integer) for videos. The next text token then
starts at max(position in the vision block) + 1, i.e. start + max((t-1) * interval, h/m - 1, w/m - 1) + 1
(for images start + max(h, w) / m, exactly as transformers computes it). For a video whose temporal extent
exceeds its spatial one, transformers 5.x advances only by max(h, w) / m; we keep the original Qwen2.5-VL
rule (transformers 4.x: max position + 1), so positions never repeat.

Consecutive images with no text between them are split by their grid sizes, so a run is never mistaken for
one image. Padding (attention_mask == 0) gets position 0 and does not advance the counter, so a
right-padded batch row has the same positions as the unpadded sample. `rope_deltas` (max position + 1 -
number of valid tokens) is what decoding adds to 1-D positions of later tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _vision_positions(start: int, grid: Sequence[int], merge: int, interval: float) -> torch.Tensor:
    t, h, w = (int(x) for x in grid)
    gh, gw = h // merge, w // merge
    ti = (torch.arange(t) * interval).long()
    tt, hh, ww = torch.meshgrid(ti, torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start


def sample_positions(
    ids: Sequence[int],
    image_grids: list,
    video_grids: list,
    video_seconds: list,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
) -> torch.Tensor:
    """Positions [3, len(ids)] of one unpadded sample; consumes grids from the front of the given lists."""
    pieces: list[torch.Tensor] = []
    pos, i, n = 0, 0, len(ids)
    unit = spatial_merge_size**2
    while i < n:
        tok = ids[i]
        if tok == image_token_id or tok == video_token_id:
            is_video = tok == video_token_id
            grids = video_grids if is_video else image_grids
            if not grids:
                kind = "video" if is_video else "image"
                raise ValueError(f"more {kind} token runs than {kind} grids (token index {i})")
            grid = grids.pop(0)
            interval = tokens_per_second * float(video_seconds.pop(0)) if is_video else 1.0
            count = int(grid[0]) * int(grid[1]) * int(grid[2]) // unit
            if i + count > n or any(t != tok for t in ids[i : i + count]):
                raise ValueError(f"grid {list(map(int, grid))} needs {count} consecutive vision tokens at index {i}")
            block = _vision_positions(pos, grid, spatial_merge_size, interval)
            pieces.append(block)
            pos = int(block.max()) + 1
            i += count
        else:
            j = i
            while j < n and ids[j] != image_token_id and ids[j] != video_token_id:
                j += 1
            pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos += j - i
            i = j
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int = -1,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE positions [3, B, S] (long) and rope deltas [B, 1] for a batch.

    Grids are consumed in order across the batch (row 0's images first), as the processor lays them out.
    """
    b, s = input_ids.shape
    images = [g.tolist() for g in image_grid_thw] if image_grid_thw is not None else []
    videos = [g.tolist() for g in video_grid_thw] if video_grid_thw is not None else []
    seconds = [float(x) for x in second_per_grid_ts] if second_per_grid_ts is not None else [1.0] * len(videos)
    positions = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, 1, dtype=torch.long)
    for row in range(b):
        valid = attention_mask[row].bool().cpu() if attention_mask is not None else torch.ones(s, dtype=torch.bool)
        ids = input_ids[row].cpu()[valid].tolist()
        pos = sample_positions(ids, images, videos, seconds, image_token_id=image_token_id,
                               video_token_id=video_token_id, spatial_merge_size=spatial_merge_size,
                               tokens_per_second=tokens_per_second)
        positions[:, row, valid] = pos
        deltas[row, 0] = (int(pos.max()) + 1 if pos.numel() else 0) - len(ids)
    if images or videos:
        raise ValueError(f"{len(images)} image and {len(videos)} video grids left over after the last token")
    return positions.to(input_ids.device), deltas.to(input_ids.device)
