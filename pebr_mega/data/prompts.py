"""Turning records into token ids: the chat template, `<image>` placeholders and image-pad expansion.

Records (GRPO and ShareGPT SFT) mark each image's place in the text with `<image>`. Qwen2.5-VL expects
`<|vision_start|><|image_pad|>...<|image_pad|><|vision_end|>` there, with one `<|image_pad|>` per merged
vision token (grid_t * grid_h * grid_w / merge_size^2). Rendering goes through the tokenizer's own chat
template, so prompts look exactly as they do for the released model.
"""
from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class TokenizedConversation:
    """A conversation's token ids and a 0/1 mask that is 1 on assistant tokens (the SFT loss positions)."""

    input_ids: list[int]
    loss_mask: list[int]


def render_conversation(tokenizer, messages: Sequence[dict], image_tokens: Sequence[int], where: str = "") -> TokenizedConversation:
    """Tokenize a ShareGPT conversation, masking everything but the assistant replies (and their `<|im_end|>`).

    The text is rendered turn by turn through the chat template: the ids of the conversation up to turn k
    are a prefix of those up to turn k+1 (Qwen's template renders each turn independently), so the span
    each assistant turn adds is exactly its reply plus the end-of-turn token.
    """
    counts = [m.get("content", "").count(IMAGE_TOKEN) for m in messages]
    if sum(counts) != len(image_tokens):
        raise DataError(f"{where or 'conversation'} has {sum(counts)} '<image>' placeholders but "
                        f"{len(image_tokens)} images")
    turns, k = [], 0
    for m, c in zip(messages, counts):
        turns.append({"role": m["role"], "content": expand_image_placeholders(m["content"], image_tokens[k:k + c], where)})
        k += c
    ids: list[int] = []
    mask: list[int] = []
    for i, turn in enumerate(turns):
        text = tokenizer.apply_chat_template(turns[: i + 1], tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        if full[: len(ids)] != ids:
            raise DataError(f"{where or 'conversation'}: the chat template does not render turns as prefixes")
        new = full[len(ids):]
        if turn["role"] == "assistant":
            # The assistant header ("<|im_start|>assistant\n") is prompt, not target.
            header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
            n_head = len(header) if new[: len(header)] == header else 0
            # Drop the newline after <|im_end|> from the target: the model stops at <|im_end|>.
            tail = 1 if len(new) > n_head and tokenizer.decode(new[-1:]) == "\n" else 0
            mask += [0] * n_head + [1] * (len(new) - n_head - tail) + [0] * tail
        else:
            mask += [0] * len(new)
        ids = full
    return TokenizedConversation(ids, mask)
