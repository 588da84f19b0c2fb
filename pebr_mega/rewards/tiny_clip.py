"""Build a tiny random CLIP in Hugging Face format, offline: for tests and the embedded demo.

The directory holds a `CLIPModel` (config + safetensors), a byte-level BPE tokenizer trained locally with HF
`tokenizers` (lower-cased, wrapped in `<|startoftext|> ... <|endoftext|>` as CLIP's is) and a
`CLIPImageProcessor`. `ClipAlignmentScorer` loads it like any CLIP checkpoint. Its weights are random: the
similarities it produces are deterministic but carry no meaning.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@dataclass
class TinyClipConfig:
    """Sizes of the tiny CLIP (~0.1 M parameters at the defaults)."""

    hidden_size: int = 32
    intermediate_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    projection_dim: int = 16
    image_size: int = 336  # the processor's crop, and the vision tower's input size
    patch_size: int = 28
    max_text_tokens: int = 248  # FG-CLIP's long-text length
    vocab_size: int = 512  # BPE target before the two special tokens
    seed: int = 0


def train_clip_tokenizer(corpus: Iterable[str], vocab_size: int, max_length: int):
    """A lower-casing byte-level BPE with CLIP's start/end tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BOS, EOS], show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=max_length, clean_up_tokenization_spaces=False)


def build_tiny_clip(out_dir: str | Path, corpus: Iterable[str], cfg: TinyClipConfig | None = None) -> Path:
    """Write a tiny random CLIP checkpoint (model, tokenizer, image processor) to `out_dir`; returns it."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    cfg = cfg or TinyClipConfig()
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_clip_tokenizer(corpus, cfg.vocab_size, cfg.max_text_tokens)
    tower = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                 num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    text = dict(tower, vocab_size=len(tokenizer), max_position_embeddings=cfg.max_text_tokens,
                bos_token_id=tokenizer.convert_tokens_to_ids(BOS), eos_token_id=eos_id, pad_token_id=eos_id)
    vision = dict(tower, image_size=cfg.image_size, patch_size=cfg.patch_size)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim)
    torch.manual_seed(cfg.seed)
    CLIPModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                       crop_size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(out)
    return out
