"""The tiny model loads offline with transformers, generates on an image, and is deterministic."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from pebr_mega.models.tiny import SPECIAL_TOKENS, TinyModelConfig, build_tiny_model, count_saved_parameters


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_loads_offline_and_generates_on_image(tiny_model_dir):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for t in SPECIAL_TOKENS:
        assert tok.convert_tokens_to_ids(t) is not None and tok.convert_tokens_to_ids(t) >= 0
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    proc = Qwen2VLImageProcessor.from_pretrained(tiny_model_dir)
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert count_saved_parameters(tiny_model_dir) <= 20_000_000

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (84, 140, 3), dtype=np.uint8))
    vis = proc(images=[img], return_tensors="pt")
    n = int(vis["image_grid_thw"].prod()) // 4
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text
    enc = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt")
    torch.manual_seed(0)
    out = model.generate(**enc, pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"],
                         max_new_tokens=5, do_sample=True)
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    from pebr_mega.data.corpus import tokenizer_corpus

    small = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                 vision_depth=1, vision_hidden_size=32, vision_heads=2, vocab_size=300)
    a = build_tiny_model(tmp_path / "a", TinyModelConfig(seed=5, **small), tokenizer_corpus())
    b = build_tiny_model(tmp_path / "b", TinyModelConfig(seed=5, **small), tokenizer_corpus())
    c = build_tiny_model(tmp_path / "c", TinyModelConfig(seed=6, **small), tokenizer_corpus())
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_tied_embeddings_and_shape_options(tiny_model_dir_alt):
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig.from_pretrained(tiny_model_dir_alt)
    assert cfg.tie_word_embeddings
    assert cfg.text_config.num_key_value_heads == 3 and cfg.vision_config.fullatt_block_indexes == [0, 2]
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir_alt / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())


def test_bad_shapes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        build_tiny_model(tmp_path, TinyModelConfig(num_heads=4, num_kv_heads=3), ["a b c"])
