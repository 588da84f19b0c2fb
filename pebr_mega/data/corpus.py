"""Text used to train the tiny model's tokenizer: the PeBR template plus the synthetic data's vocabulary.

A byte-level BPE encodes any text; training it on the words the demo uses keeps sequences short.
"""
from __future__ import annotations

from typing import Iterator

from pebr_mega.data.template import INSTRUCTION, format_response

_WORDS = (
    "red green blue yellow purple orange gray brown cyan white black circle circles square squares "
    "triangle triangles shape shapes object objects image picture there is are how many what color "
    "remove all the of and left after removing count counts total difference more than fewer number "
    "answer question step describe description rationale rationales first then so we have minus plus "
    "equals is a an in on with which one two three four five six seven eight nine ten zero"
)


def tokenizer_corpus() -> Iterator[str]:
    """Sentences covering the template, the answer format, digits and the synthetic vocabulary."""
    words = _WORDS.split()
    for rep in range(4):
        yield INSTRUCTION
        yield format_response("There are 3 red circles and 2 blue squares.", "Count each kind of shape.",
                              ["3 + 2 = 5.", "So there are 5 shapes."], "5")
        for i, w in enumerate(words):
            yield f"{w} {words[(i * 7 + rep) % len(words)]} {i % 10} {w.capitalize()}s: {i} - {rep} = {i - rep}"
    yield "0123456789 + - * / = ( ) . , ? ! : ; ' \" \\frac{1}{2} \\sqrt{2} x^2 \\pi"
