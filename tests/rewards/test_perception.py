"""The perception metric: a description's (count, colour, shape) groups against the scene, exact and per-group F1."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from pebr_mega.data.synthetic import SynthConfig, describe_scene, make_question, sample_scene, sft_response
from pebr_mega.data.template import format_response
from pebr_mega.rewards.perception import (description_attributes, description_groups, description_metrics,
                                         description_scores)


def _scene_counts(scene) -> Counter:
    return Counter((o.color, o.shape) for o in scene.objects)


def _phrase(n: int, color: str, shape: str) -> str:
    return f"{n} {color} {shape}{'' if n == 1 else 's'}"


def _expected(pred: Counter, ref: Counter) -> tuple[float, float]:
    """Exact and F1 from the (colour, shape) -> count maps directly (the independent reference)."""
    p = {(n, c, s) for (c, s), n in pred.items() if n}
    r = {(n, c, s) for (c, s), n in ref.items() if n}
    return float(p == r), (2 * len(p & r) / (len(p) + len(r)) if p or r else 1.0)


def _response(description: str) -> str:
    return format_response(description, "r", ["s"], "1")


def test_reference_description_scores_one_and_perturbations_score_by_group():
    rng = random.Random(0)
    cfg = SynthConfig(max_objects=6)
    for _ in range(200):
        scene = sample_scene(rng, cfg)
        ref = describe_scene(scene, shapes=True)
        response = sft_response(scene, make_question(scene, rng, shapes=True), shapes=True)
        assert description_scores(response, ref) == (1.0, 1.0)
        # A perceived scene: each group's count off by one, its colour swapped, or the group dropped, at random.
        truth = _scene_counts(scene)
        seen = Counter()
        for (c, s), n in truth.items():
            move = rng.choice(["keep", "keep", "count", "color", "drop"])
            if move == "count":
                seen[(c, s)] += n + rng.choice([-1, 1])
            elif move == "color":
                seen[(rng.choice([x for x in ("red", "green", "blue", "yellow") if x != c]), s)] += n
            elif move == "keep":
                seen[(c, s)] += n
        listing = ", ".join(_phrase(n, c, s) for (c, s), n in sorted(seen.items()) if n) or "none"
        got = description_scores(format_response(listing + ".", "r", ["s"], "1"), ref)
        assert got == pytest.approx(_expected(seen, truth)), (listing, ref)


def test_parsing_is_order_and_form_tolerant_and_counts_junk_as_wrong():
    ref = "2 red circles, 1 blue square."
    assert description_scores("### Image Description: 1 Blue Square and two red circles\n### Rationales: x", ref) \
        == (1.0, 1.0)
    assert description_groups("a red circle; 3 green triangles.").groups == Counter({(1, "red circle"): 1,
                                                                                    (3, "green triangle"): 1})
    # One right group and one item that is not a group: precision 1/2, recall 1/2.
    assert description_scores(_response("2 red circles, some shapes."), ref) == (0.0, 0.5)
    # A duplicated group is a wrong extra group.
    assert description_scores(_response("2 red circles, 2 red circles, 1 blue square."), ref) \
        == pytest.approx((0.0, 0.8))
    assert description_scores("no description here", ref) == (0.0, 0.0)
    assert description_scores(_response("none."), "none.") == (1.0, 1.0)


def test_metrics_average_over_the_responses_with_a_reference():
    ok = _response("1 red circle.")
    bad = _response("2 red circles.")
    m = description_metrics([ok, bad, ok], ["1 red circle.", "1 red circle.", None])
    assert m == {"eval/description_exact": 0.5, "eval/description_f1": 0.5, "eval/description_count_color_exact": 0.5,
                 "eval/description_omission": 0.0, "eval/description_extra": 0.0,
                 "eval/description_shape_accuracy": 1.0}
    assert description_metrics([ok], [None]) == {}
    with pytest.raises(ValueError):
        description_metrics([ok], [])


def _expected_attributes(pred: Counter, ref: Counter) -> tuple[float, float, float, int, int]:
    """(count+colour exact, omission, extra, groups right, groups right up to the shape) from (colour, shape) ->
    count maps."""
    def by_color(m: Counter) -> Counter:
        return Counter((n, c) for (c, _), n in m.items() if n)
    p = {(n, c, s) for (c, s), n in pred.items() if n}
    r = {(n, c, s) for (c, s), n in ref.items() if n}
    return (float(by_color(pred) == by_color(ref)), float(len(p) < len(r)), float(len(p) > len(r)), len(p & r),
            sum((by_color(pred) & by_color(ref)).values()))


def test_attribute_scores_against_scene_counts_on_random_scenes():
    """count+colour exactness, omissions, extra groups and shape accuracy of random perturbations of random scenes
    (shapes swapped, groups dropped or added, counts and colours changed), against the scene's (colour, shape)
    counts directly."""
    rng = random.Random(4)
    cfg = SynthConfig(max_objects=6)
    colors, shapes = ("red", "blue", "green", "yellow"), ("circle", "square", "triangle")
    right = total = 0
    pairs = []
    for _ in range(300):
        ref = _scene_counts(sample_scene(rng, cfg))
        pred = Counter(ref)
        for _ in range(rng.randint(0, 2)):
            if not pred:
                break
            key = rng.choice(sorted(pred))
            op = rng.choice(("shape", "drop", "count", "color", "add"))
            if op == "add":
                pred[(rng.choice(colors), rng.choice(shapes))] += rng.randint(1, 2)
                continue
            n = pred.pop(key)
            c, s = key
            new = {"shape": (c, rng.choice(shapes)), "color": (rng.choice(colors), s)}.get(op, key)
            if op == "count":
                n = max(1, n + rng.choice((-1, 1)))
            if op != "drop":
                pred[new] += n
        text = ", ".join(_phrase(n, c, s) for (c, s), n in sorted(pred.items())) + "."
        ref_text = ", ".join(_phrase(n, c, s) for (c, s), n in sorted(ref.items())) + "."
        got = description_attributes(_response(text), ref_text)
        cc, om, ex, r, t = _expected_attributes(pred, ref)
        assert (got["count_color_exact"], got["omission"], got["extra"]) == (cc, om, ex), (text, ref_text)
        assert got["shape_accuracy"] == (r / t if t else None), (text, ref_text)
        right, total = right + r, total + t
        pairs.append((_response(text), ref_text))
    m = description_metrics([p for p, _ in pairs], [r for _, r in pairs])
    assert m["eval/description_shape_accuracy"] == pytest.approx(right / total)
    assert 0 < m["eval/description_omission"] < 1 and 0 < m["eval/description_count_color_exact"] < 1
    assert 0 < m["eval/description_extra"] < 1


def test_a_response_without_a_description_omits_everything():
    got = description_attributes("The answer is 3.", "1 red circle, 2 blue squares.")
    assert got == {"count_color_exact": 0.0, "omission": 1.0, "extra": 0.0, "shape_accuracy": None}


def test_in_the_colour_and_count_world_exact_is_count_colour_exact_and_no_shape_is_scored():
    """References that name no shape ("2 red objects"): a description is exact when its counts and colours are,
    shape accuracy is not reported, and a description that names shapes is not exact."""
    rng = random.Random(5)
    cfg = SynthConfig(max_objects=6)
    responses, refs = [], []
    for _ in range(100):
        scene = sample_scene(rng, cfg)
        ref = describe_scene(scene)
        assert "object" in ref and not any(s in ref for s in ("circle", "square", "triangle"))
        # Colour counts directly from the objects, one perturbed at random: a count off by one, or a colour dropped.
        counts = Counter(o.color for o in scene.objects)
        if rng.random() < 0.5:
            c = rng.choice(sorted(counts))
            counts[c] += rng.choice((-1, 1)) if rng.random() < 0.5 else -counts[c]
        text = ", ".join(_phrase(n, c, "object") for c, n in sorted(counts.items()) if n) + "."
        got = description_attributes(_response(text), ref)
        exact, _ = description_scores(_response(text), ref)
        assert got["count_color_exact"] == exact == float(+counts == Counter(o.color for o in scene.objects))
        assert got["shape_accuracy"] is None
        responses.append(_response(text))
        refs.append(ref)
    m = description_metrics(responses, refs)
    assert "eval/description_shape_accuracy" not in m and 0 < m["eval/description_exact"] < 1
    assert m["eval/description_exact"] == m["eval/description_count_color_exact"]
    assert description_scores(_response("2 red circles."), "2 red objects.")[0] == 0.0
