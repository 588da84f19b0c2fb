"""Text rewards (format, accuracy vs MathRuler, keyword, length), stage presets, failure counting, config."""
from __future__ import annotations

import random
import re

import pytest
from mathruler.grader import grade_answer

from pebr_mega.config import ConfigError, load_config
from pebr_mega.errors import PebrError
from pebr_mega.rewards import (RewardConfig, RewardSample, accuracy_reward, build_reward, extract_description,
                               extract_final_answer, format_reward, keyword_reward, length_reward, summarize)


def _response(answer_line="### The final answer is: 3", desc="There are 3 red circles."):
    return (f"### Image Description: {desc}\n### Rationales: count them.\n### Let's think step by step.\n"
            f"### Step 1: one, two, three.\n{answer_line}")


# ---------------------------------------------------------------------------------------------- upstream's rules
# A re-statement of upstream's reward rules (cythu/PeBR-R1 examples/reward_function/pebr_1.py, pebr_2.py,
# pebr_sample.py), written here independently of the code under test: the expectations below come from it.
def _upstream_normalize(response):
    return re.sub(r"\s*(<|>|/)\s*", r"\1", response)


def _upstream_format(response):
    response = _upstream_normalize(response)
    headers = [r"###\s*Image Description:", r"###\s*Rationales:", r"###\s*Step\s*1:", r"###\s*The final answer is:"]
    return 1.0 if all(re.search(h, response, re.IGNORECASE) for h in headers) else 0.0


def _upstream_accuracy(response, truth):
    response = _upstream_normalize(response)
    m = re.search(r"### The final answer is:\s*([^\n]*)", response)
    given = m.group(1).strip() if m else response.strip()
    return 1.0 if grade_answer(given, truth.strip()) else 0.0


def _upstream_caption(response):
    m = re.search(r"###\s*Image Description:\s*(.*?)###\s*Rationales:", _upstream_normalize(response),
                  re.DOTALL | re.IGNORECASE)
    return m.group(1).strip() if m else ""


# ---------------------------------------------------------------------------------------------- format
FORMAT_CASES = [
    _response(),
    "###  image description: x\n### RATIONALES: y\n###Step 1: z\n### the final answer is: 1",
    "###Image Description:x ###Rationales:y ### step1: z ###The Final Answer Is:1",
    "### Image  Description: x\n### Rationales: y\n### Step 1: z\n### The final answer is: 1",  # two spaces
    "### Image Description : x\n### Rationales: y\n### Step 1: z\n### The final answer is: 1",  # space before ':'
    _response().replace("### Rationales:", "Rationales:"),
    _response().replace("### Step 1:", "### Step 10:"),
    _response().replace("### The final answer is:", "The answer:"),
    "### Image Description: x",
    "",
]


@pytest.mark.parametrize("text", FORMAT_CASES)
def test_format_is_upstreams_rule(text):
    assert format_reward(text) == _upstream_format(text)


def test_format_cases_cover_both_outcomes():
    assert {_upstream_format(t) for t in FORMAT_CASES} == {0.0, 1.0}
    assert format_reward(FORMAT_CASES[1]) == 1.0 and format_reward(FORMAT_CASES[3]) == 0.0


# ---------------------------------------------------------------------------------------------- accuracy
# Responses whose upstream and lenient grades differ: (response, ground truth, what lenient grading extracts).
GRADING_DIFFERS = [
    (_response("### The final answer is: B."), "B", "B"),  # upstream grades "B." (MathRuler: not "B")
    (_response("### The final answer is: **42**"), "42", "42"),  # markdown bold kept by upstream
    (_response("### the final answer is: 42"), "42", "42"),  # lower-case header: upstream grades everything
    ("42", "42", None),  # no header: upstream grades the whole response, lenient scores 0
    ("\\boxed{7}", "7", None),  # no header: upstream's whole-text fallback still finds a boxed answer
    ("### The final answer is: 2\n... wait ...\n### The final answer is: 3", "3", "3"),  # first vs last header
]

# Responses both gradings read alike, drawn from what upstream's rule does.
UPSTREAM_CASES = [
    (_response("### The final answer is: \\frac{1}{2}"), "0.5"),
    (_response("### The final answer is: 1 / 2"), "0.5"),  # the whitespace around '/' is removed first
    (_response("### The final answer is:\n\n12"), "12"),  # the answer on a later line
    (_response("### The final answer is: 4"), "3"),
    (_response("### The final answer is: (A)"), "A"),
    (_response("### The final answer is: 12 cm"), " 12 "),  # the ground truth is stripped
    (_response("### The final answer is: "), "3"),  # an empty answer
    (_response("### The final answer is: B."), "B"),
    ("### The final answer is: 5", "5"),
    (_response("### The final answer is: $\\boxed{3}$."), "3"),  # MathRuler unwraps this itself
]


@pytest.mark.parametrize("response, truth", UPSTREAM_CASES + [(r, t) for r, t, _ in GRADING_DIFFERS])
def test_upstream_grading_matches_upstreams_rule(response, truth):
    assert accuracy_reward(response, truth) == _upstream_accuracy(response, truth)
    assert accuracy_reward(response, truth, grading="upstream") == _upstream_accuracy(response, truth)


@pytest.mark.parametrize("response, truth, lenient_answer", GRADING_DIFFERS)
def test_gradings_differ_where_documented(response, truth, lenient_answer):
    lenient = 0.0 if lenient_answer is None else float(grade_answer(lenient_answer, truth))
    assert extract_final_answer(response) == lenient_answer
    assert accuracy_reward(response, truth, grading="lenient") == lenient
    assert accuracy_reward(response, truth, grading="upstream") == _upstream_accuracy(response, truth)
    assert lenient != _upstream_accuracy(response, truth), response


# Empty answers (issue 23, item 6): MathRuler calls two empty strings equal, so upstream pays 1.0 for an empty
# final answer against an empty ground truth; ours scores 0 in both gradings.
EMPTY_ANSWER_CASES = [
    ("", ""),
    ("### The final answer is: ", ""),
    ("### The final answer is: 3", ""),
    ("### The final answer is: 3", "   "),
    (_response("### The final answer is: "), ""),
    ("   ", "  "),
]


@pytest.mark.parametrize("grading", ["upstream", "lenient"])
@pytest.mark.parametrize("response, truth", EMPTY_ANSWER_CASES)
def test_empty_answer_or_ground_truth_scores_zero(response, truth, grading):
    assert accuracy_reward(response, truth, grading=grading) == 0.0


def test_upstream_would_pay_the_empty_pair_which_we_do_not():
    assert _upstream_accuracy("### The final answer is: ", "") == 1.0  # the deviation, on record
    assert accuracy_reward("### The final answer is: ", "") == 0.0
    assert accuracy_reward("### The final answer is: 3", "3") == _upstream_accuracy("### The final answer is: 3", "3")


def test_unknown_grading_is_an_error():
    with pytest.raises(ValueError, match="upstream"):
        accuracy_reward("### The final answer is: 1", "1", grading="strict")


LENIENT_CASES = [  # (what follows the header, what lenient extraction must give, ground truth)
    ("\\frac{1}{2}", "\\frac{1}{2}", "0.5"),
    ("0.5", "0.5", "\\frac{1}{2}"),
    ("\\boxed{3}", "3", "3"),
    ("$\\boxed{3}$.", "3", "3"),
    ("3.", "3", "3"),
    ("**0.75**", "0.75", "\\frac{3}{4}"),
    ("\\(\\frac{3}{4}\\)", "\\frac{3}{4}", "0.75"),
    ("4", "4", "3"),
    ("12 cm", "12 cm", "12"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"),
    ("(A)", "(A)", "A"),
    ("B", "B", "b"),
    ("\\boxed{1}+\\boxed{2}", "\\boxed{1}+\\boxed{2}", "3"),
    ("$x$ and $y$", "$x$ and $y$", "x"),
    ("", "", "3"),
]


@pytest.mark.parametrize("after, extracted, truth", LENIENT_CASES)
def test_lenient_accuracy_matches_mathruler_reference(after, extracted, truth):
    resp = _response(f"### The final answer is: {after}")
    assert extract_final_answer(resp) == extracted
    assert accuracy_reward(resp, truth, grading="lenient") == float(grade_answer(extracted, truth))


def test_lenient_header_variants():
    for header in ("### The final answer is:", "### the FINAL answer IS :", "###The  final answer is:"):
        assert accuracy_reward(_response(f"{header} \\frac{{1}}{{2}}"), "0.5", grading="lenient") == 1.0
    assert accuracy_reward("### The final answer is:\n3\n", "3", grading="lenient") == 1.0
    assert extract_final_answer("the answer is 3") is None


@pytest.mark.parametrize("text", [
    _response(desc="Two  blue squares."),
    "###  image description:\nmulti\nline\n### rationales: x",
    "### Image Description:   \n### Rationales: x",
    "no sections at all",
    "### Image Description: only this",  # no Rationales header: upstream finds no description
    "### Image Description: a / b\n### Step 1: s\n### Rationales: r",  # up to the Rationales header
])
def test_description_is_upstreams_caption(text):
    assert (extract_description(text) or "") == _upstream_caption(text)


# ---------------------------------------------------------------------------------------------- keyword, length
def test_keyword_fraction_case_insensitive():
    text = "There are three RED circles and a Blue square."
    assert keyword_reward(text, ["red", "blue", "green", "Circle"]) == 0.75
    assert keyword_reward("a speed of 3 km / h", ["km/h"]) == 1.0  # upstream matches in the normalised text
    # strict: blank key words are ignored, not free matches; upstream: compared as written ("" is in any text)
    assert keyword_reward(text, ["  red ", ""], "strict") == 1.0 and keyword_reward(text, ["  red ", ""]) == 0.5
    assert keyword_reward(text, []) == 0.0 and keyword_reward(text, ["", " "], "strict") == 0.0


def test_length_reward():
    assert length_reward(0) == 1.0 and length_reward(512) == 1.0
    assert length_reward(513) == pytest.approx(512 / 513) and length_reward(2048) == 0.25
    assert length_reward(200, limit=100) == 0.5
    with pytest.raises(ValueError):
        length_reward(-1)


# ---------------------------------------------------------------------------------------------- presets
def _sample(rng, **kw):
    answer = str(rng.randint(0, 9))
    given = answer if rng.random() < 0.5 else str(rng.randint(10, 20))
    words = rng.sample(["red", "blue", "circle", "square", "three", "green"], 3)
    desc = " ".join(rng.sample(["red", "blue", "circle", "square", "three", "big"], 3))
    text = _response(f"### The final answer is: {given}", desc=desc)
    if rng.random() < 0.3:
        text = text.replace("### Rationales:", "Rationales:")
    base = dict(response=text, response_tokens=rng.randint(100, 1500), answer=answer, key_words=words)
    base.update(kw)
    return RewardSample(**base)


def test_stage2_total_is_0p9_accuracy_plus_0p1_format():
    rng = random.Random(0)
    batch = [_sample(rng) for _ in range(24)]
    model = build_reward(RewardConfig(), "stage2")
    results = model.score(batch)
    for s, r in zip(batch, results):
        acc, fmt = accuracy_reward(s.response, s.answer), format_reward(s.response)
        assert r.components == {"accuracy": acc, "format": fmt}
        assert r.total == pytest.approx(0.9 * acc + 0.1 * fmt)
    assert {r.total for r in results} >= {1.0, 0.0}  # the random batch covers both ends
    m = summarize(results)
    assert m["reward/accuracy"] == pytest.approx(sum(r.components["accuracy"] for r in results) / 24)
    assert m["reward/total"] == pytest.approx(sum(r.total for r in results) / 24)
    assert m["reward_failures/accuracy"] == 0 and "reward/clip" not in m


def test_stage1_without_clip_weight_and_with_overrides():
    rng = random.Random(1)
    batch = [_sample(rng) for _ in range(16)]
    cfg = RewardConfig(weights={"clip": 0.0, "keyword": 0.5, "length": 0.4})
    results = build_reward(cfg, "stage1").score(batch)
    for s, r in zip(batch, results):
        kw, fmt = keyword_reward(s.response, s.key_words), format_reward(s.response)
        ln = length_reward(s.response_tokens, 512)
        assert set(r.components) == {"keyword", "format", "length", "accuracy"}
        assert r.components["accuracy"] == accuracy_reward(s.response, s.answer)  # logged, not rewarded
        assert r.total == pytest.approx(0.5 * kw + 0.1 * fmt + 0.4 * ln)


def test_failures_and_warnings_are_counted_never_raised():
    rng = random.Random(2)
    batch = [_sample(rng) for _ in range(5)]
    batch[1].answer = None  # a record without an answer: accuracy raises inside
    batch[2].response_tokens = -3  # a broken token count: length raises
    batch[3].key_words = []
    batch[4].key_words = [" "]
    cfg = RewardConfig(weights={"clip": 0.0})
    model = build_reward(cfg, "stage1")
    results = model.score(batch)
    assert results[1].components["accuracy"] == 0.0 and results[1].failures == ["accuracy"]
    assert results[2].components["length"] == 0.0 and results[2].failures == ["length"]
    assert results[3].warnings == ["keyword_empty"] and results[4].warnings == ["keyword_empty"]
    assert results[3].components["keyword"] == 0.0
    assert "AttributeError" in model.last_errors["accuracy"]
    m = summarize(results)
    assert (m["reward_failures/accuracy"], m["reward_failures/length"], m["reward_failures/keyword"]) == (1, 1, 0)
    assert m["reward_warnings/keyword_empty"] == 2 and m["reward/count"] == 5


def test_clip_preset_without_model_dir_fails_at_build():
    with pytest.raises(PebrError, match=r"rewards\.clip_model_dir"):
        build_reward(RewardConfig(), "stage1")
    with pytest.raises(PebrError, match=r"rewards\.weights\.kw"):
        build_reward(RewardConfig(weights={"kw": 1.0}), "stage2")
    with pytest.raises(PebrError, match=r"rewards\.clip_model_dir=.*nowhere"):
        build_reward(RewardConfig(clip_model_dir="/nowhere/clip"), "stage1")


def test_reward_config_in_root_schema():
    cfg = load_config(None, ["rewards.weights.format=0.2", "rewards.length_limit=256"])
    assert (cfg.rewards.weights, cfg.rewards.length_limit) == ({"format": 0.2}, 256)
    assert cfg.rewards.answer_grading == "upstream"
    assert load_config(None, ["rewards.answer_grading=lenient"]).rewards.answer_grading == "lenient"
    with pytest.raises(ConfigError, match=r"rewards\.answer_grading"):
        load_config(None, ["rewards.answer_grading=strict"])
    assert (cfg.rewards.clip_threshold, cfg.rewards.clip_image_size, cfg.rewards.clip_max_text_tokens) == (0.4, 336, 248)
    # One stage switch (issue 13, item 5): the preset is grpo.stage's; the old second key is refused by name.
    with pytest.raises(ConfigError, match=r"'rewards\.stage' .* removed: grpo\.stage alone selects"):
        load_config(None, ["grpo.stage=stage2", "rewards.stage=stage1"])
    with pytest.raises(ConfigError, match=r"rewards\.weights\.clip"):
        load_config(None, ["rewards.weights.clip=high"])


@pytest.mark.parametrize("key_words,upstream,strict", [
    (["Red", "circle"], 1.0, 1.0),
    (["red", "circle "], 0.5, 1.0),    # upstream compares "circle " with its space (the text has "circle.")
    (["", "square"], 0.5, 0.0),        # upstream: a blank key word is found in any text; strict drops it
    (["  "], 0.0, 0.0),                # "  " is not in the text; strict has no key word left
    ([], 0.0, 0.0),
])
def test_keyword_match_upstream_by_default_and_strict_on_request(key_words, upstream, strict):
    """Issue 24, item 7: upstream's `key_word_reward` (`kw.lower() in response.lower()`, in pebr_1.py) by default;
    `rewards.keyword_match=strict` strips and drops blank key words."""
    text = "### Image Description: a red circle."
    assert keyword_reward(text, key_words) == upstream
    assert keyword_reward(text, key_words, "strict") == strict
