"""The text rewards: format, accuracy (MathRuler), keyword, length (PEBR_FACTS, "Rewards").

Headers are matched case-insensitively with flexible spacing (`###  image description :` counts), both in
the format check and in the answer/description extraction (upstream's answer regex was case-sensitive while
its format check was not).
"""
from __future__ import annotations

import re
from typing import Sequence

_FLAGS = re.IGNORECASE
DESCRIPTION_HEADER = re.compile(r"###\s*image\s+description\s*:", _FLAGS)
RATIONALES_HEADER = re.compile(r"###\s*rationales\s*:", _FLAGS)
STEP1_HEADER = re.compile(r"###\s*step\s*1\s*:", _FLAGS)
ANSWER_HEADER = re.compile(r"###\s*the\s+final\s+answer\s+is\s*:", _FLAGS)
REQUIRED_HEADERS = (DESCRIPTION_HEADER, RATIONALES_HEADER, STEP1_HEADER, ANSWER_HEADER)

# The answer is the rest of the line after the (last) answer header. Leading whitespace may include line
# breaks, so "### The final answer is:\n42" yields "42" as upstream's `\s*([^\n]*)` did.
_ANSWER_LINE = re.compile(ANSWER_HEADER.pattern + r"\s*([^\n]*)", _FLAGS)
_NEXT_HEADER = re.compile(r"###")


def format_reward(text: str) -> float:
    """1.0 if all four headers (description, rationales, step 1, final answer) are present, else 0.0."""
    return 1.0 if all(h.search(text) for h in REQUIRED_HEADERS) else 0.0


def _unwrap_braced(s: str, prefix: str) -> str | None:
    """The content of `prefix{...}` when that group spans the whole string (braces balanced), else None."""
    if not s.startswith(prefix + "{") or not s.endswith("}"):
        return None
    depth = 0
    for i, ch in enumerate(s[len(prefix):]):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
            # The group closes here: it wraps the whole string only if this is the last character.
            return s[len(prefix) + 1: -1] if len(prefix) + i == len(s) - 1 else None
    return None


def _strip_once(s: str) -> str:
    s = s.strip()
    for left, right in (("**", "**"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("`", "`")):
        inner = s[len(left): -len(right)]
        # "$a$ and $b$" is not one wrapped answer: only unwrap when the delimiter does not recur inside.
        if len(s) > len(left) + len(right) and s.startswith(left) and s.endswith(right) and left not in inner:
            return inner
    for prefix in ("\\boxed", "\\fbox"):
        inner = _unwrap_braced(s, prefix)
        if inner is not None:
            return inner
    if s.endswith(".") and not s.endswith(".."):
        return s[:-1]
    return s


def clean_answer(s: str) -> str:
    """Strip what wraps an answer without changing it: whitespace, a trailing period, `**`, `$`, `\\(\\)`,
    and a `\\boxed{}` around the whole answer (repeated until nothing changes: `$\\boxed{3}$.` -> `3`)."""
    prev = None
    while prev != s:
        prev, s = s, _strip_once(s)
    return s.strip()


def extract_final_answer(text: str) -> str | None:
    """The cleaned rest of the line after the last `### The final answer is:`; None when there is no header."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    return clean_answer(matches[-1])


def extract_description(text: str) -> str | None:
    """The text of the `### Image Description:` section, up to the next `###` header; None when absent/empty."""
    m = DESCRIPTION_HEADER.search(text)
    if m is None:
        return None
    rest = text[m.end():]
    nxt = _NEXT_HEADER.search(rest)
    body = (rest[: nxt.start()] if nxt else rest).strip()
    return body or None


def accuracy_reward(text: str, answer: str) -> float:
    """1.0 if the extracted final answer matches `answer` under MathRuler's `grade_answer`, else 0.0."""
    from mathruler.grader import grade_answer

    given = extract_final_answer(text)
    if given is None:
        return 0.0
    return 1.0 if grade_answer(given, answer.strip()) else 0.0


def normalize_key_words(key_words: Sequence[str]) -> list[str]:
    """Key words lower-cased and stripped; blank ones are dropped (an empty string would match any text)."""
    return [k.strip().lower() for k in key_words if k.strip()]


def keyword_reward(text: str, key_words: Sequence[str]) -> float:
    """Fraction of `key_words` found in `text` (case-insensitive substring); 0.0 for an empty list.

    The empty case is a data problem, not a model failure: `RewardModel` counts it as a warning.
    """
    words = normalize_key_words(key_words)
    if not words:
        return 0.0
    low = text.lower()
    return sum(w in low for w in words) / len(words)


def length_reward(num_tokens: int, limit: int = 512) -> float:
    """1.0 for a response of at most `limit` tokens, else `limit / num_tokens` (shrinking with length)."""
    if limit <= 0:
        raise ValueError(f"length limit must be positive, got {limit}")
    if num_tokens < 0:
        raise ValueError(f"token count must be >= 0, got {num_tokens}")
    return 1.0 if num_tokens <= limit else limit / num_tokens
