"""The FLOP formula equals torch's FlopCounterMode count of transformers' Qwen2.5-VL forward."""
from __future__ import annotations

import torch

from pebr_mega.models.arch import arch_from_hf_dir
from pebr_mega.models.flops import decoder_forward_flops, train_step_flops, vision_forward_flops


def test_forward_flops_match_flop_counter(tiny_model_dir_alt):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    d = tiny_model_dir_alt
    arch = arch_from_hf_dir(d)
    # eager attention: explicit full s x s matmuls, which FlopCounterMode counts exactly
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(d, attn_implementation="eager").eval()
    grid = torch.tensor([[1, 8, 12], [1, 4, 4]])
    n_img = int(grid.prod(-1).sum()) // 4
    s = n_img + 37
    ids = torch.randint(0, 700, (1, s))
    ids[0, 5:5 + 24] = arch.image_token_id  # the 8x12 image (24 merged tokens) ...
    ids[0, 40:44] = arch.image_token_id  # ... and, after some text, the 4x4 one
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
              mm_token_type_ids=(ids == arch.image_token_id).int())
    expected = decoder_forward_flops(arch.text, s, causal=False) + vision_forward_flops(arch.vision, grid)
    assert counter.get_total_flops() == expected


def test_causal_halves_attention_and_training_is_three_forwards(tiny_model_dir):
    arch = arch_from_hf_dir(tiny_model_dir)
    t = arch.text
    full, causal = decoder_forward_flops(t, 64, causal=False), decoder_forward_flops(t, 64)
    assert full - causal == t.num_layers * 2 * t.num_heads * t.head_dim * 64 * 64
    assert train_step_flops(arch, 64, batch=2) == 3 * 2 * causal
