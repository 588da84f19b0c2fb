"""Turning records into token ids: the chat template, `<image>` placeholders and image-pad expansion.

(SFT conversations are tokenised in `pebr_mega.data.sft_records`, with the same placeholder expansion.)
Records (GRPO and ShareGPT SFT) mark each image's place in the text with `<image>`. Qwen2.5-VL expects
`<|vision_start|><|image_pad|>...<|image_pad|><|vision_end|>` there, with one `<|image_pad|>` per merged
vision token (grid_t * grid_h * grid_w / merge_size^2). Rendering goes through the tokenizer's own chat
template, so prompts look exactly as they do for the released model.
"""
from __future__ import annotations

from typing import Sequence

from pebr_mega.data.template import IMAGE_TOKEN, PromptTemplate, build_prompt_text
from pebr_mega.errors import DataError

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def expand_image_placeholders(text: str, image_tokens: Sequence[int], where: str = "") -> str:
    """Replace the i-th `<image>` by a vision block of `image_tokens[i]` pads; counts must agree."""
    parts = text.split(IMAGE_TOKEN)
    if len(parts) - 1 != len(image_tokens):
        raise DataError(f"{where or 'text'} has {len(parts) - 1} '<image>' placeholders but "
                        f"{len(image_tokens)} images")
    out = [parts[0]]
    for n, tail in zip(image_tokens, parts[1:]):
        out.append(VISION_START + IMAGE_PAD * n + VISION_END + tail)
    return "".join(out)


def render_prompt_ids(tokenizer, problem: str, image_tokens: Sequence[int], where: str = "",
                      template: PromptTemplate | None = None) -> list[int]:
    """Token ids of a GRPO prompt: the format-prompt template rendered with the problem as the user turn
    (`template`, default: the packaged one), then the assistant header.

    EasyR1 splits the rendered text at `<image>` into a list of text and image parts and lets the processor's
    chat template print `<|vision_start|><|image_pad|><|vision_end|>` for each image; expanding the
    placeholders in the text first gives the same string, so the same ids.
    """
    content = expand_image_placeholders(build_prompt_text(problem, template), image_tokens, where)
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
