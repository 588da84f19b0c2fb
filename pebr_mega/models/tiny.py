"""Build a tiny Qwen2.5-VL in Hugging Face format, offline, deterministically.

The result is a complete HF model directory: `config.json`, `model.safetensors`, a byte-level BPE tokenizer
trained locally with HF `tokenizers` that carries Qwen's special tokens and Qwen2-VL's chat template, the
Qwen2-VL image processor config and a generation config. `Qwen2_5_VLForConditionalGeneration`,
`AutoTokenizer` and `Qwen2VLImageProcessor` load it with no network.

The architecture is the real one (vision tower with window attention and full-attention blocks, 2x2 patch
merger, Qwen2 decoder with GQA, qkv bias and M-RoPE); only the sizes are small.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

# Qwen's special tokens, in Qwen's own order. Qwen2.5-VL's ids start at 151643; the tiny model appends them
# after the trained BPE vocabulary and records the resulting ids in config.json.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL / Qwen2.5-VL chat template (a format, needed so prompts look as they do for the real model):
# an image content item becomes <|vision_start|><|image_pad|><|vision_end|>, which the processor later
# expands to one <|image_pad|> per merged vision token.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class TinyModelConfig:
    """Sizes of the tiny model; the defaults make ~1 M parameters that train in seconds on a CPU."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 1024  # BPE merges target; the special tokens are added on top
    tie_word_embeddings: bool = False
    mrope_section: Sequence[int] | None = None  # default: split head_dim/2 as Qwen does (1:1.5:1.5)
    rope_theta: float = 1_000_000.0
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_intermediate_size: int = 128
    vision_heads: int = 2
    vision_window_size: int = 56  # pixels; 56 / 14 / 2 = 2 merged tokens per window side
    vision_fullatt_blocks: Sequence[int] | None = None  # default: the last block
    min_pixels: int = 56 * 56
    max_pixels: int = 224 * 224
    max_position_embeddings: int = 4096
    seed: int = 0
    extra: dict = field(default_factory=dict)


def default_mrope_section(head_dim: int) -> list[int]:
    """Split the rotary half-dimension into (temporal, height, width) as Qwen2.5-VL does ([16, 24, 24] for 128)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Train a byte-level BPE on `corpus` and wrap it as a transformers fast tokenizer with Qwen's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Single digits as Qwen does, so numbers are spelled digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_hf_config(cfg: TinyModelConfig, tokenizer) -> "object":
    """The `Qwen2_5_VLConfig` for `cfg`, with token ids taken from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    head_dim = cfg.hidden_size // cfg.num_heads
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(
            f"hidden_size {cfg.hidden_size} must divide by num_heads {cfg.num_heads}, "
            f"and num_heads by num_kv_heads {cfg.num_kv_heads}"
        )
    mrope = list(cfg.mrope_section or default_mrope_section(head_dim))
    if sum(mrope) != head_dim // 2:
        raise ValueError(f"mrope_section {mrope} must sum to head_dim/2 = {head_dim // 2}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = len(tokenizer)
    fullatt = list(cfg.vision_fullatt_blocks if cfg.vision_fullatt_blocks is not None else [cfg.vision_depth - 1])
    text = dict(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta, "mrope_section": mrope},
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
        max_window_layers=cfg.num_layers,
        dtype="float32",
    )
    vision = dict(
        depth=cfg.vision_depth,
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_intermediate_size,
        num_heads=cfg.vision_heads,
        out_hidden_size=cfg.hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=cfg.vision_window_size,
        fullatt_block_indexes=fullatt,
        tokens_per_second=2,
        hidden_act="silu",
        in_channels=3,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=cfg.tie_word_embeddings,
        dtype="float32",
    )


def build_tiny_model(out_dir: str | Path, cfg: TinyModelConfig, corpus: Iterable[str]) -> Path:
    """Write a complete tiny Qwen2.5-VL HF directory to `out_dir` and return its path.

    Deterministic: the same `cfg` (seed included) and corpus give byte-identical weights and tokenizer.
    """
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    hf_config = build_hf_config(cfg, tokenizer)

    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(hf_config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    image_processor = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    image_processor.save_pretrained(out)

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot,
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=256,
    ).save_pretrained(out)
    (out / "pebr_tiny_model.json").write_text(json.dumps(asdict(cfg), indent=2, default=list) + "\n")
    return out


def count_saved_parameters(model_dir: str | Path) -> int:
    """Number of parameters stored in a model directory's safetensors files."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
