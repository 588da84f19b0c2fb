"""Perception scores: does a response's `### Image Description:` state the scene's groups exactly?

A description of the synthetic shapes set lists groups, "2 red circles, 1 blue square." (one group per
colour and shape, in any order). `description_groups` parses such a list into a multiset of
(count, phrase) groups, where the phrase's last word loses a plural "s" ("2 red circles" ->
(2, "red circle")). Items that do not read as "<count> <words>" are kept as unparsed items: they count as
wrong groups, so rambling is not free.

Per response, against the reference description (the synthetic records' `description`):

    exact = 1 when the groups equal the reference's (as multisets) and nothing is unparsed, else 0
    f1    = 2 tp / (predicted groups + unparsed items + reference groups), tp = groups in both (multiset)

The description is read as the CLIP reward reads it (`rewards.text.extract_description`: the text between
`### Image Description:` and `### Rationales:`); a response without one scores 0 on both. Two empty lists ("none.") agree: exact = f1 = 1.
`description_metrics` averages these over the responses that have a reference (`eval/description_exact`,
`eval/description_f1`), with three per-attribute scores (`description_attributes`), where a group's phrase is
its attributes then its noun ("red circle": attribute "red", noun "circle"):

    count_color_exact = exact, with every group's noun dropped: the counts and colours are right, whatever the
                        shapes (what a model that cannot tell shapes apart can still get right)
    omission          = 1 when the description states fewer items than the reference has groups (a group left out)
    extra             = 1 when it states more items than the reference has groups (a group that is not there)
    shape_accuracy    = of the groups right up to the noun, the share whose noun is right too (None when no
                        group's count and colour are right, or when the reference names no shape: its nouns
                        are all generic, "2 red objects", and a description naming shapes is then not exact)
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from pebr_mega.rewards.text import extract_description

NUMBER_WORDS = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven",
                                             "eight", "nine", "ten"))} | {"a": 1, "an": 1}
_ITEM_SEPARATOR = re.compile(r",|;|\band\b|\n")
_ITEM = re.compile(r"^(\d+|[a-z]+)\s+([a-z][a-z ]*?)$")
EMPTY_WORDS = {"none", "nothing", "no objects"}
GENERIC_NOUNS = {"object", "thing", "item", "shape"}  # a group named by these names no shape


@dataclass
class Groups:
    """What a description states: its (count, phrase) groups and how many items did not parse as one."""

    groups: Counter
    unparsed: int = 0


def _singular(phrase: str) -> str:
    head, _, last = phrase.rpartition(" ")
    if last.endswith("s") and not last.endswith("ss"):
        last = last[:-1]
    return f"{head} {last}".strip()


def description_groups(description: str) -> Groups:
    """The (count, singular phrase) groups a description lists, and the number of items that are not groups."""
    text = description.strip().lower().rstrip(".").strip()
    groups: Counter = Counter()
    unparsed = 0
    for item in _ITEM_SEPARATOR.split(text):
        item = " ".join(item.split()).strip(" .")
        if not item or item in EMPTY_WORDS:
            continue
        m = _ITEM.match(item)
        count = None
        if m:
            word = m.group(1)
            count = int(word) if word.isdigit() else NUMBER_WORDS.get(word)
        if count is None:
            unparsed += 1
            continue
        groups[(count, _singular(m.group(2)))] += 1
    return Groups(groups, unparsed)


def description_scores(response: str, reference: str) -> tuple[float, float]:
    """(exact, f1) of the response's description section against the reference description."""
    ref = description_groups(reference)
    desc = extract_description(response)
    if desc is None:
        return 0.0, 0.0
    pred = description_groups(desc)
    n_pred = sum(pred.groups.values()) + pred.unparsed
    n_ref = sum(ref.groups.values()) + ref.unparsed
    if n_pred + n_ref == 0:
        return 1.0, 1.0
    tp = sum((pred.groups & ref.groups).values())
    exact = float(pred.groups == ref.groups and pred.unparsed == 0)
    return exact, 2.0 * tp / (n_pred + n_ref)


def _drop_nouns(groups: Counter) -> Counter:
    out: Counter = Counter()
    for (count, phrase), n in groups.items():
        out[(count, phrase.rpartition(" ")[0])] += n
    return out


def _names_shapes(groups: Counter) -> bool:
    return any(phrase.rpartition(" ")[2] not in GENERIC_NOUNS for _, phrase in groups)


def _shape_counts(pred: Counter, ref: Counter) -> tuple[int, int]:
    """(groups right with their noun, groups right up to the noun) of `pred` against `ref`; (0, 0) when the
    reference names no shape."""
    if not _names_shapes(ref):
        return 0, 0
    return sum((pred & ref).values()), sum((_drop_nouns(pred) & _drop_nouns(ref)).values())


def description_attributes(response: str, reference: str) -> dict[str, float | None]:
    """`count_color_exact`, `omission`, `extra` and `shape_accuracy` (module docstring) of the response's
    description."""
    ref = description_groups(reference)
    desc = extract_description(response)
    pred = description_groups(desc) if desc is not None else Groups(Counter(), 0)
    pred_cc, ref_cc = _drop_nouns(pred.groups), _drop_nouns(ref.groups)
    right, right_up_to_noun = _shape_counts(pred.groups, ref.groups)
    stated, expected = sum(pred.groups.values()) + pred.unparsed, sum(ref.groups.values())
    return {
        "count_color_exact": float(desc is not None and pred_cc == ref_cc and pred.unparsed == 0),
        "omission": float(stated < expected),
        "extra": float(stated > expected),
        "shape_accuracy": right / right_up_to_noun if right_up_to_noun else None,
    }


def description_metrics(responses: Sequence[str], references: Sequence[str | None]) -> dict[str, float]:
    """Means over the responses with a reference ({} if none): `eval/description_exact`, `eval/description_f1`,
    `eval/description_count_color_exact`, `eval/description_omission`, `eval/description_extra`, and
    `eval/description_shape_accuracy`
    (over the groups right up to the noun, pooled: their right nouns / their number)."""
    if len(responses) != len(references):
        raise ValueError(f"{len(responses)} responses but {len(references)} references")
    pairs = [(r, ref) for r, ref in zip(responses, references) if ref is not None]
    if not pairs:
        return {}
    scores = [description_scores(r, ref) for r, ref in pairs]
    attrs = [description_attributes(r, ref) for r, ref in pairs]
    out = {"eval/description_exact": sum(e for e, _ in scores) / len(scores),
           "eval/description_f1": sum(f for _, f in scores) / len(scores),
           "eval/description_count_color_exact": sum(a["count_color_exact"] for a in attrs) / len(attrs),
           "eval/description_omission": sum(a["omission"] for a in attrs) / len(attrs),
           "eval/description_extra": sum(a["extra"] for a in attrs) / len(attrs)}
    shapes = _pooled_shape_accuracy(pairs)
    if shapes is not None:
        out["eval/description_shape_accuracy"] = shapes
    return out


def _pooled_shape_accuracy(pairs: Sequence[tuple[str, str]]) -> float | None:
    right = total = 0
    for response, reference in pairs:
        desc = extract_description(response)
        if desc is None:
            continue
        r, t = _shape_counts(description_groups(desc).groups, description_groups(reference).groups)
        right, total = right + r, total + t
    return right / total if total else None
