"""The plain-torch vision tower equals transformers' Qwen2.5-VL ViT; its index helpers equal transformers'."""
from __future__ import annotations

import pytest
import torch

from pebr_mega.models.arch import arch_from_hf_dir
from pebr_mega.models.vision import VisionTower, frame_lengths, patch_rc_coordinates, window_order

GRIDS = [[[1, 6, 10]], [[1, 16, 8], [1, 4, 4]], [[1, 14, 22], [2, 8, 6], [1, 2, 2]]]


def _hf_and_ours(model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = VisionTower(arch_from_hf_dir(model_dir).vision)
    ours.load_state_dict({k[len("model.visual."):]: v for k, v in hf.state_dict().items() if k.startswith("model.visual.")})
    return hf, ours


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_model_dir_alt"])
def test_tower_matches_transformers(request, which):
    hf, ours = _hf_and_ours(request.getfixturevalue(which))
    for i, grid in enumerate(GRIDS):
        g = torch.tensor(grid)
        torch.manual_seed(i)
        pixels = torch.randn(int(g.prod(-1).sum()), 3 * 2 * 14 * 14)
        with torch.no_grad():
            ref = torch.cat(hf.model.get_image_features(pixels, g).pooler_output)
            out = ours(pixels, g)
        assert out.shape == ref.shape
        assert float((out - ref).abs().max()) < 1e-5, grid


def test_tower_gradients_match_transformers(tiny_model_dir_alt):
    """Backward through the one-call window and full attention (uneven windows at the image borders)."""
    hf, ours = _hf_and_ours(tiny_model_dir_alt)
    g = torch.tensor(GRIDS[2])
    torch.manual_seed(3)
    pixels = torch.randn(int(g.prod(-1).sum()), 3 * 2 * 14 * 14)
    weight = torch.randn(int(g.prod(-1).sum()) // 4, hf.config.vision_config.out_hidden_size)
    (torch.cat(hf.model.get_image_features(pixels, g).pooler_output) * weight).sum().backward()
    (ours(pixels, g) * weight).sum().backward()
    theirs = dict(hf.model.visual.named_parameters())
    for name, p in ours.named_parameters():
        ref = theirs[name].grad
        err = float((p.grad - ref).abs().max()) / max(float(ref.abs().max()), 1e-12)
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("window,merge,patch", [(56, 2, 14), (112, 2, 14), (224, 2, 14)])
def test_window_order_matches_transformers(window, merge, patch):
    from transformers.vision_utils import get_vision_window_index

    for grid in GRIDS:
        g = torch.tensor(grid)
        ref_index, ref_cu = get_vision_window_index(g, spatial_merge_size=merge, window_size=window, patch_size=patch)
        index, lens = window_order(g, merge, window // merge // patch)
        assert torch.equal(index, ref_index)
        assert torch.equal(torch.tensor([0] + lens).cumsum(0).int(), ref_cu)


def test_patch_coordinates_and_frame_lengths_match_transformers():
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    for grid in GRIDS:
        g = torch.tensor(grid)
        assert torch.equal(patch_rc_coordinates(g, 2), get_vision_position_ids(g, 2))
        assert torch.equal(torch.tensor([0] + frame_lengths(g)).cumsum(0).int(), get_vision_cu_seqlens(g))


def test_tower_grads_are_marked_for_tp_averaging(tiny_model_dir):
    tower = VisionTower(arch_from_hf_dir(tiny_model_dir).vision)
    assert all(getattr(p, "average_gradients_across_tp_domain", False) for p in tower.parameters())


def test_pixel_count_mismatch_is_a_clear_error(tiny_model_dir):
    tower = VisionTower(arch_from_hf_dir(tiny_model_dir).vision)
    with pytest.raises(ValueError, match="patches"):
        tower(torch.randn(10, 3 * 2 * 14 * 14), torch.tensor([[1, 4, 4]]))
