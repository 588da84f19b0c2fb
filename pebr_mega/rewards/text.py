"""The text rewards: format, accuracy (MathRuler), keyword, length (PEBR_FACTS, "Rewards").

Upstream's `compute_score` (`examples/reward_function/pebr_1.py`, `pebr_2.py`) first removes the whitespace
around `<`, `>` and `/` in the response (`normalize_response` here); the format, keyword and CLIP-description
rules read that normalised text, as upstream's do. The format check is upstream's: the four headers in any
case, with any whitespace after `###` (`###image description:` counts, `### Image  Description:` does not). The accuracy reward has two gradings (`rewards.answer_grading`):

- `upstream` (default): exactly upstream's `accuracy_reward`: in the normalised response, the first
  case-sensitive match of `### The final answer is:` followed by optional whitespace (newlines included) and
  the rest of that line; the stripped rest is graded; with no such header the whole stripped response is
  graded; MathRuler's `grade_answer(given, answer.strip())` decides.
- `lenient`: the last header, matched case-insensitively; the answer is unwrapped from `**`, `$`, `\(\)`,
  `\boxed{}` and a trailing period before grading; no header scores 0.

All functions here are pure (picklable, no state), so they can run in worker processes.
"""
from __future__ import annotations

import re
from typing import Sequence

_FLAGS = re.IGNORECASE
# The four headers the format reward requires, as upstream writes them: any case, any whitespace after `###`
# (and between "Step" and "1"), the words and the colon as shown.
REQUIRED_HEADERS = tuple(re.compile(p, _FLAGS) for p in (
    r"###\s*Image Description:", r"###\s*Rationales:", r"###\s*Step\s*1:", r"###\s*The final answer is:"))

# Lenient grading: the answer is the rest of the line after the last answer header, matched in any case with
# flexible spacing. Leading whitespace may include line breaks ("### The final answer is:\n42" gives "42").
ANSWER_HEADER = re.compile(r"###\s*the\s+final\s+answer\s+is\s*:", _FLAGS)
_ANSWER_LINE = re.compile(ANSWER_HEADER.pattern + r"\s*([^\n]*)", _FLAGS)

# Upstream's rules (examples/reward_function/pebr_{1,2,sample}.py).
GRADINGS = ("upstream", "lenient")
_AROUND_TAG_CHARS = re.compile(r"\s*([<>/])\s*")
_UPSTREAM_ANSWER_LINE = re.compile(r"### The final answer is:\s*([^\n]*)")  # case-sensitive, first match
_UPSTREAM_DESCRIPTION = re.compile(r"###\s*Image Description:\s*(.*?)###\s*Rationales:", re.DOTALL | _FLAGS)


def normalize_response(text: str) -> str:
    """The response with the whitespace around `<`, `>` and `/` removed (upstream's first step)."""
    return _AROUND_TAG_CHARS.sub(r"\1", text)


def format_reward(text: str) -> float:
    """1.0 if all four headers (description, rationales, step 1, final answer) are present in the normalised
    response, else 0.0."""
    text = normalize_response(text)
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


def extract_upstream_answer(text: str) -> str:
    """The string upstream grades: the stripped rest of the line after the first `### The final answer is:`
    (case-sensitive) in the normalised response, or the whole stripped response when there is none."""
    text = normalize_response(text)
    m = _UPSTREAM_ANSWER_LINE.search(text)
    return m.group(1).strip() if m else text.strip()


def extract_description(text: str) -> str | None:
    """The image description as upstream's CLIP reward reads it: in the normalised response, the stripped
    text between the first `### Image Description:` and the next `### Rationales:` (both case-insensitive);
    None when there is no such pair of headers or the text between them is empty."""
    m = _UPSTREAM_DESCRIPTION.search(normalize_response(text))
    return (m.group(1).strip() or None) if m else None


def accuracy_reward(text: str, answer: str, grading: str = "upstream") -> float:
    """1.0 if the response's answer matches `answer` under MathRuler's `grade_answer`, else 0.0.

    `grading` picks how the answer is taken from the response: "upstream" or "lenient" (module docstring).
    An empty (blank) ground truth or an empty extracted answer scores 0.0: MathRuler calls two empty strings
    equal, so upstream pays full reward for `### The final answer is:` with nothing after it on a record with
    no answer. Every non-empty pair is graded exactly as upstream grades it.
    """
    from mathruler.grader import grade_answer

    if grading == "upstream":
        given = extract_upstream_answer(text)
    elif grading == "lenient":
        given = extract_final_answer(text)
        if given is None:
            return 0.0
    else:
        raise ValueError(f"answer grading must be one of {list(GRADINGS)}, got {grading!r}")
    truth = answer.strip()
    if not truth or not given.strip():
        return 0.0  # nothing to match, or nothing answered: MathRuler would call two empty strings equal
    return 1.0 if grade_answer(given, truth) else 0.0


KEYWORD_MATCHES = ("upstream", "strict")


def normalize_key_words(key_words: Sequence[str]) -> list[str]:
    """Key words lower-cased and stripped; blank ones are dropped (an empty string would match any text)."""
    return [k.strip().lower() for k in key_words if k.strip()]


def keyword_reward(text: str, key_words: Sequence[str], match: str = "upstream") -> float:
    """Fraction of `key_words` found in the normalised `text` (case-insensitive substring); 0.0 for an empty list.

    `match="upstream"` (default) compares each key word as it is, lower-cased (upstream's `key_word_reward` in
    `pebr_1.py`): surrounding spaces must match too, and a blank key word is found in any text. `"strict"` strips
    each key word and drops blank ones first (`normalize_key_words`). The empty case is a data problem, not a
    model failure: `RewardModel` counts it as a warning.
    """
    if match not in KEYWORD_MATCHES:
        raise ValueError(f"keyword match {match!r}; one of {KEYWORD_MATCHES}")
    words = [k.lower() for k in key_words] if match == "upstream" else normalize_key_words(key_words)
    if not words:
        return 0.0
    low = normalize_response(text).lower()
    return sum(w in low for w in words) / len(words)


def length_reward(num_tokens: int, limit: int = 512) -> float:
    """1.0 for a response of at most `limit` tokens, else `limit / num_tokens` (shrinking with length)."""
    if limit <= 0:
        raise ValueError(f"length limit must be positive, got {limit}")
    if num_tokens < 0:
        raise ValueError(f"token count must be >= 0, got {num_tokens}")
    return 1.0 if num_tokens <= limit else limit / num_tokens
