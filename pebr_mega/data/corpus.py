"""Text used to train the tiny model's tokenizer: the PeBR template plus the synthetic data's vocabulary.

A byte-level BPE encodes any text; training it on the sentences the demo uses (the synthetic dataset's own
prompts and PeBR-format responses, rendered by `pebr_mega.data.synthetic`) keeps sequences short.
"""
from __future__ import annotations

from typing import Iterator

from pebr_mega.data.synthetic import COLORS, SHAPES, WORDS, corpus_texts, plural
from pebr_mega.data.template import build_prompt_text, format_response

_GENERIC = ("image picture shape shapes describe description rationale rationales step answer question first "
            "then so we have plus equals a an with which one two three four five six seven eight nine ten zero")


def vocabulary() -> list[str]:
    """Every word the synthetic data uses, plus a few generic ones, each once."""
    words = list(COLORS) + list(SHAPES) + [plural(s) for s in SHAPES] + WORDS + _GENERIC.split()
    return list(dict.fromkeys(words))


def tokenizer_corpus() -> Iterator[str]:
    """Sentences covering the template, the answer format, digits and the synthetic data's phrasing."""
    words = vocabulary()
    # The instruction followed by one newline, as the corpus has always had it: the trained vocabulary (whose
    # size must stay divisible by the tensor-parallel sizes the tests use) does not depend on the template's
    # blank line before the problem.
    instruction = build_prompt_text("").rstrip("\n") + "\n"
    for rep in range(4):
        yield instruction
        yield format_response("There are 3 red circles and 2 blue squares.", "Count each kind of shape.",
                              ["3 + 2 = 5.", "So there are 5 shapes."], "5")
        for i, w in enumerate(words):
            yield f"{w} {words[(i * 7 + rep) % len(words)]} {i % 10} {w.capitalize()}: {i} - {rep} = {i - rep}"
    for text in corpus_texts(num=200, seed=0):
        yield instruction + text if text.startswith("<image>") else text
    yield "0123456789 + - * / = ( ) . , ? ! : ; ' \" \\frac{1}{2} \\sqrt{2} x^2 \\pi"
