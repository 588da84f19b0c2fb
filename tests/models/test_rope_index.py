"""Our M-RoPE index equals transformers' Qwen2.5-VL get_rope_index on random image layouts."""
from __future__ import annotations

import random

import pytest
import torch

from pebr_mega.models.rope_index import get_rope_index

IMG, VID, VSTART, VEND = 50, 51, 48, 49
MERGE = 2


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           spatial_merge_size=MERGE, tokens_per_second=2),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    with torch.device("meta"):
        return Qwen2_5_VLModel(cfg)


def _random_batch(rng: random.Random, batch: int, videos: bool):
    """Rows of text with 0-3 images (and maybe videos) between vision_start/end, right padded."""
    rows, img_grids, vid_grids, seconds = [], [], [], []
    for _ in range(batch):
        ids = [rng.randrange(0, 40) for _ in range(rng.randint(1, 6))]
        for k in range(rng.randint(1 if videos else 0, 3)):
            if videos and (k == 0 or rng.random() < 0.5):
                # (t-1) * interval <= 6 < h/m: the temporal extent never exceeds the spatial one, the case in which
                # transformers 5.x (start + max(h, w)/m) and the original Qwen rule (max position + 1) agree.
                grid = [rng.choice([2, 4]), rng.choice([8, 12]) * MERGE, rng.choice([4, 6]) * MERGE]
                secs = rng.choice([0.5, 1.0])
                tok, vid_grids_ref = VID, vid_grids
                seconds.append(secs)
            else:
                grid = [1, rng.randint(1, 6) * MERGE, rng.randint(1, 6) * MERGE]
                tok, vid_grids_ref = IMG, img_grids
            vid_grids_ref.append(grid)
            ids += [VSTART] + [tok] * (grid[0] * grid[1] * grid[2] // MERGE**2) + [VEND]
            ids += [rng.randrange(0, 40) for _ in range(rng.randint(0, 5))]
        rows.append(ids)
    s = max(len(r) for r in rows)
    input_ids = torch.zeros(batch, s, dtype=torch.long)
    mask = torch.zeros(batch, s, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    as_t = lambda g: torch.tensor(g, dtype=torch.long) if g else None  # noqa: E731
    return input_ids, mask, as_t(img_grids), as_t(vid_grids), (torch.tensor(seconds) if seconds else None)


def _ours(input_ids, mask, img, vid, secs):
    return get_rope_index(input_ids, img, vid, secs, mask, image_token_id=IMG, video_token_id=VID,
                          spatial_merge_size=MERGE, tokens_per_second=2)


def _theirs(model, input_ids, mask, img, vid, secs):
    types = (input_ids == IMG).int() + 2 * (input_ids == VID).int()
    return model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=img, video_grid_thw=vid,
                                second_per_grid_ts=secs, attention_mask=mask)


@pytest.mark.parametrize("seed", range(12))
def test_matches_transformers_on_random_image_layouts(hf_model, seed):
    rng = random.Random(seed)
    input_ids, mask, img, vid, secs = _random_batch(rng, batch=rng.randint(1, 4), videos=False)
    pos, delta = _ours(input_ids, mask, img, vid, secs)
    ref_pos, ref_delta = _theirs(hf_model, input_ids, mask, img, vid, secs)
    valid = mask.bool()
    assert torch.equal(pos[:, valid], ref_pos[:, valid])
    assert torch.equal(delta, ref_delta.to(delta.dtype))
    assert (pos[:, ~valid] == 0).all()


@pytest.mark.parametrize("seed", range(4))
def test_matches_transformers_with_videos(hf_model, seed):
    rng = random.Random(100 + seed)
    input_ids, mask, img, vid, secs = _random_batch(rng, batch=2, videos=True)
    assert vid is not None
    pos, delta = _ours(input_ids, mask, img, vid, secs)
    ref_pos, ref_delta = _theirs(hf_model, input_ids, mask, img, vid, secs)
    valid = mask.bool()
    assert torch.equal(pos[:, valid], ref_pos[:, valid])
    assert torch.equal(delta, ref_delta.to(delta.dtype))


def test_text_only_is_arange_and_adjacent_images_split_by_grid():
    ids = torch.arange(7)[None]
    pos, delta = get_rope_index(ids, image_token_id=IMG)
    assert torch.equal(pos, torch.arange(7).expand(3, 1, 7)) and delta.item() == 0
    # Two 2x2-merged images back to back with no separator: each gets its own grid origin.
    ids = torch.tensor([[1] + [IMG] * 4 + [IMG] * 2 + [2]])
    pos, _ = get_rope_index(ids, torch.tensor([[1, 4, 4], [1, 2, 4]]), image_token_id=IMG, spatial_merge_size=2)
    assert pos[:, 0, 1:5].tolist() == [[1, 1, 1, 1], [1, 1, 2, 2], [1, 2, 1, 2]]
    assert pos[:, 0, 5:7].tolist() == [[3, 3], [3, 3], [3, 4]]
    assert pos[:, 0, 7].tolist() == [5, 5, 5]


def test_grid_mismatch_is_a_clear_error():
    ids = torch.tensor([[1, IMG, IMG, 2]])
    with pytest.raises(ValueError, match="consecutive vision tokens"):
        get_rope_index(ids, torch.tensor([[1, 4, 4]]), image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(ValueError, match="left over"):
        get_rope_index(torch.tensor([[1, 2]]), torch.tensor([[1, 2, 2]]), image_token_id=IMG)
