"""The synthetic shapes dataset: deterministic, held-out eval, correct answers, valid records, PeBR format, in
both worlds (colour and count, the default; colour, shape and count with `describe_shapes`)."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pebr_mega.cli import main as cli_main
from pebr_mega.data.images import ImageConfig
from pebr_mega.data.pil_backend import PilImageDecoder
from pebr_mega.data.synthetic import COLORS, SHAPES, SynthConfig, write_synthetic_dataset
from pebr_mega.data.template import build_prompt_text

HEADERS = [r"###\s*image\s+description\s*:", r"###\s*rationales\s*:", r"###\s*step\s*1\s*:",
           r"###\s*the\s+final\s+answer\s+is\s*:"]


WORLDS = {"color_count": False, "color_shape": True}


@pytest.fixture(scope="module", params=list(WORLDS))
def shapes(request) -> bool:
    """Whether the world names shapes."""
    return WORLDS[request.param]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, shapes) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, SynthConfig(num=48, seed=7, describe_shapes=shapes))
    return out


def _load(out: Path, name: str):
    return json.loads((out / name).read_text(encoding="utf-8"))


def _digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(out)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- independent checks
def _count(objects: list[dict], color: str | None = None, shape: str | None = None) -> int:
    return sum(1 for o in objects if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape))


def _group_count(objects: list[dict], phrase: str) -> int:
    """Count for "red objects" / "circles"."""
    m = re.fullmatch(r"(\w+) objects", phrase)
    if m:
        return _count(objects, color=m.group(1))
    m = re.fullmatch(r"(circle|square|triangle)s", phrase)
    assert m, phrase
    return _count(objects, shape=m.group(1))


def _expected_answer(problem: str, objects: list[dict]) -> str:
    """The answer recomputed from the question text and the scene's objects, without the generator's code."""
    q = problem.replace("<image>", "")
    if q == "How many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"What color is the (\w+)\?", q):
        (obj,) = [o for o in objects if o["shape"] == m.group(1)]
        return obj["color"]
    if m := re.fullmatch(r"Remove all (.+)\. How many objects are left\?", q):
        return str(len(objects) - _group_count(objects, m.group(1)))
    if m := re.fullmatch(r"How many more (.+) than (.+) are there\?", q):
        a, b = _group_count(objects, m.group(1)), _group_count(objects, m.group(2))
        assert a >= b, q
        return str(a - b)
    if m := re.fullmatch(r"How many (\w+) (circle|square|triangle)s are there\?", q):
        return str(_count(objects, color=m.group(1), shape=m.group(2)))
    if m := re.fullmatch(r"How many (.+) are there\?", q):
        return str(_group_count(objects, m.group(1)))
    raise AssertionError(f"unexpected question {q!r}")


def _nouns(shapes: bool) -> tuple[str, ...]:
    return SHAPES if shapes else ("object",)


def _group_counts(objects: list[dict], shapes: bool) -> Counter:
    return Counter((o["color"], o["shape"] if shapes else "object") for o in objects)


def _description(objects: list[dict], shapes: bool) -> str:
    counts = _group_counts(objects, shapes)
    parts = [f"{counts[(c, s)]} {c} {s}{'' if counts[(c, s)] == 1 else 's'}"
             for c in COLORS for s in _nouns(shapes) if counts[(c, s)]]
    return ", ".join(parts) + "."


def _without_last_group(objects: list[dict], shapes: bool) -> list[dict]:
    """The objects less the last group the description lists (all of them for a scene of one group)."""
    counts = _group_counts(objects, shapes)
    groups = [(c, s) for c in COLORS for s in _nouns(shapes) if counts[(c, s)]]
    if len(groups) < 2:
        return objects
    c, s = groups[-1]
    return [o for o in objects if not (o["color"] == c and s in ("object", o["shape"]))]


def _teacher_answer(problem: str, objects: list[dict], shapes: bool) -> str:
    """What an omitting teacher answers: counting questions count what it saw, the others stay right."""
    counting = re.fullmatch(r"How many objects are there\?|Remove all .+|How many \w+ objects are there\?", problem)
    return _expected_answer(problem, _without_last_group(objects, shapes) if counting else objects)


def _objects_in_pixels(path: Path) -> Counter:
    """(color, shape) of each connected blob of one palette colour; shape from how much of its box it fills."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    names = {tuple(rgb): name for name, rgb in COLORS.items()}
    todo = {(y, x): names[tuple(pixels[y, x])] for y, x in zip(*np.nonzero((pixels != (245, 245, 245)).any(-1)))}
    found = Counter()
    while todo:
        start, color = todo.popitem()
        blob, stack = [start], [start]
        while stack:
            y, x = stack.pop()
            for nb in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if todo.get(nb) == color:
                    del todo[nb]
                    blob.append(nb)
                    stack.append(nb)
        ys, xs = zip(*blob)
        fill = len(blob) / ((max(ys) - min(ys) + 1) * (max(xs) - min(xs) + 1))
        shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
        found[(color, shape)] += 1
    return found


# ---------------------------------------------------------------------------------------------- tests
def test_same_seed_same_bytes_other_seed_other_data(tmp_path, dataset, shapes):
    cfg = SynthConfig(num=48, seed=7, describe_shapes=shapes)
    write_synthetic_dataset(tmp_path / "again", cfg)
    assert _digest(tmp_path / "again") == _digest(dataset)
    write_synthetic_dataset(tmp_path / "other", SynthConfig(num=48, seed=8, describe_shapes=shapes))
    assert _load(tmp_path / "other", "grpo.json") != _load(dataset, "grpo.json")


def test_split_sizes_and_eval_is_held_out(dataset):
    grpo, sft, held = _load(dataset, "grpo.json"), _load(dataset, "sft.json"), _load(dataset, "eval.json")
    assert (len(grpo), len(sft), len(held)) == (48, 48, 32)  # eval = max(32, 48 // 4)
    assert SynthConfig(num=400).split_sizes() == {"grpo": 400, "sft": 400, "eval": 100}
    assert not {r["qid"] for r in grpo} & {r["qid"] for r in held}
    image_sets = [{p for r in recs for p in r["images"]} for recs in (grpo, sft, held)]
    assert sum(map(len, image_sets)) == len(set().union(*image_sets)) == 48 + 48 + 32
    # Disjoint in content too, not only in file names.
    contents = [hashlib.sha256((dataset / p).read_bytes()).hexdigest() for s in image_sets for p in s]
    assert len(set(contents)) == len(contents)


def test_every_answer_matches_the_scene_and_the_pixels(dataset, shapes):
    scenes = _load(dataset, "scenes.json")
    for name in ("grpo.json", "eval.json"):
        for rec in _load(dataset, name):
            objects = scenes[rec["images"][0]]["objects"]
            assert rec["answer"] == _expected_answer(rec["problem"], objects), rec
            assert rec["description"] == _description(objects, shapes)
    kinds = Counter()
    for path, scene in scenes.items():
        objects = scene["objects"]
        assert 1 <= len(objects) <= 6
        assert _objects_in_pixels(dataset / path) == Counter((o["color"], o["shape"]) for o in objects), path
        kinds[len(objects)] += 1
    assert len(kinds) >= 5  # object counts vary


def test_grpo_records_are_valid(dataset, shapes):
    for name in ("grpo.json", "eval.json"):
        for rec in _load(dataset, name):
            assert set(rec) >= {"qid", "problem", "answer", "images", "key_words"}
            assert rec["problem"].count("<image>") == 1
            assert isinstance(rec["answer"], str) and (rec["answer"].isdigit() or rec["answer"] in COLORS)
            assert rec["answer"] in COLORS or 0 <= int(rec["answer"]) <= 6
            assert len(rec["images"]) == 1 and (dataset / rec["images"][0]).is_file()
            assert rec["key_words"] and all(isinstance(k, str) and k for k in rec["key_words"])
            # A correct answer mentions every key word (keyword reward 1): each is in the description or question.
            text = (rec["description"] + " " + rec["problem"]).lower()
            assert all(k.lower() in text for k in rec["key_words"]), rec
    problems = Counter(re.sub(r"\b(red|green|blue|yellow|circle|square|triangle)s?\b", "X", r["problem"])
                       for r in _load(dataset, "grpo.json"))
    assert len(problems) >= (7 if shapes else 4)  # perception and reasoning templates both occur
    named = {s for r in _load(dataset, "grpo.json") for s in SHAPES
             if s in r["problem"] + r["description"] + " ".join(r["key_words"])}
    assert bool(named) == shapes  # shapes are named in the world that names them, nowhere else


def test_sft_responses_follow_the_pebr_format_and_are_correct(dataset, shapes):
    scenes = _load(dataset, "scenes.json")
    for rec in _load(dataset, "sft.json"):
        user, assistant = rec["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        instruction = build_prompt_text("")
        assert user["content"].startswith(instruction) and user["content"].count("<image>") == 1
        response = assistant["content"]
        for header in HEADERS:
            assert re.search(header, response, flags=re.IGNORECASE), (header, response)
        assert "### Let's think step by step." in response
        objects = scenes[rec["images"][0]]["objects"]
        problem = user["content"][len(instruction):]
        answer = re.search(r"### The final answer is:(.*)$", response, flags=re.IGNORECASE).group(1).strip()
        assert answer == _expected_answer(problem, objects)
        assert re.search(r"### Image Description:(.*)", response).group(1).strip() == _description(objects, shapes)
        steps = re.findall(r"^### Step (\d+):", response, flags=re.MULTILINE)
        assert 1 <= len(steps) <= 3 and steps == [str(i) for i in range(1, len(steps) + 1)]
        assert len(response) < 400  # compact enough for a tiny model


def test_a_sloppy_teacher_errs_only_in_sft_reasoning_answers(dataset, shapes, tmp_path):
    """sft_teacher_error: reasoning answers one above the teacher's own last step, at about the asked rate."""
    sloppy = tmp_path / "sloppy"
    write_synthetic_dataset(sloppy, SynthConfig(num=48, seed=7, sft_teacher_error=0.6, describe_shapes=shapes))
    for name in ("grpo.json", "eval.json", "scenes.json"):  # only the SFT answers differ
        assert _load(sloppy, name) == _load(dataset, name), name
    reasoning = wrong = 0
    for clean, noisy in zip(_load(dataset, "sft.json"), _load(sloppy, "sft.json")):
        a, b = clean["messages"][1]["content"], noisy["messages"][1]["content"]
        head_a, answer_a = a.rsplit("### The final answer is: ", 1)
        head_b, answer_b = b.rsplit("### The final answer is: ", 1)
        assert head_a == head_b  # description, rationale and steps stay the teacher's correct ones
        if re.search(r"Remove all|How many more", clean["messages"][0]["content"]):
            reasoning += 1
            wrong += answer_a != answer_b
            assert answer_b in (answer_a, str(int(answer_a) + 1))
        else:
            assert answer_a == answer_b
    assert reasoning >= 10 and 0.35 <= wrong / reasoning <= 0.85, (wrong, reasoning)
    with pytest.raises(ValueError, match="sft_teacher_error"):
        write_synthetic_dataset(tmp_path / "bad", SynthConfig(num=4, sft_teacher_error=1.5))


def _description_line(response: str) -> str:
    return re.search(r"### Image Description:(.*)", response).group(1).strip()


def _final_answer(response: str) -> str:
    return response.rsplit("### The final answer is:", 1)[1].strip()


def test_an_omitting_teacher_leaves_out_the_last_group_and_counts_without_it(shapes, tmp_path):
    """sft_description_omission: SFT descriptions of scenes with 2+ groups lose their last group at about the
    asked rate, drawn by seed, and the teacher's counting follows what it described ("How many (red) objects",
    "Remove all ..." answered without that group); other answers, and every GRPO / held-out record, stay right."""
    omitting = tmp_path / "omitting"
    write_synthetic_dataset(omitting, SynthConfig(num=48, num_sft=160, seed=7, sft_description_omission=0.7,
                                                  describe_shapes=shapes))
    clean = tmp_path / "clean"
    write_synthetic_dataset(clean, SynthConfig(num=48, num_sft=160, seed=7, describe_shapes=shapes))
    for name in ("grpo.json", "eval.json", "scenes.json"):  # only the SFT responses differ
        assert _load(omitting, name) == _load(clean, name), name
    for rec in _load(omitting, "grpo.json") + _load(omitting, "eval.json"):
        objects = _load(omitting, "scenes.json")[rec["images"][0]]["objects"]
        assert rec["description"] == _description(objects, shapes)
        assert rec["answer"] == _expected_answer(rec["problem"], objects)
    scenes = _load(omitting, "scenes.json")
    instruction = build_prompt_text("")
    multi = omitted = answers_changed = 0
    for a, b in zip(_load(clean, "sft.json"), _load(omitting, "sft.json")):
        objects = scenes[a["images"][0]]["objects"]
        problem = a["messages"][0]["content"][len(instruction):].replace("<image>", "")
        ra, rb = a["messages"][1]["content"], b["messages"][1]["content"]
        full, got = _description_line(ra), _description_line(rb)
        assert full == _description(objects, shapes) and _final_answer(ra) == _expected_answer(problem, objects)
        groups = full.rstrip(".").split(", ")
        multi += len(groups) > 1
        if got == full:  # not omitted (always so for a scene of one group): the response is the correct one
            assert ra == rb
            continue
        omitted += 1
        assert len(groups) > 1
        assert got == ", ".join(groups[:-1]) + "." == _description(_without_last_group(objects, shapes), shapes)
        assert _final_answer(rb) == _teacher_answer(problem, objects, shapes), (problem, full, rb)
        answers_changed += _final_answer(rb) != _final_answer(ra)
    assert multi >= 60 and 0.55 <= omitted / multi <= 0.85, (omitted, multi)
    assert answers_changed >= 10  # the habit reaches the answers
    again = tmp_path / "again"
    write_synthetic_dataset(again, SynthConfig(num=48, num_sft=160, seed=7, sft_description_omission=0.7,
                                               describe_shapes=shapes))
    assert (again / "sft.json").read_bytes() == (omitting / "sft.json").read_bytes()
    other = tmp_path / "other"  # another seed draws other omissions (and other scenes)
    write_synthetic_dataset(other, SynthConfig(num=48, num_sft=160, seed=8, sft_description_omission=0.7,
                                               describe_shapes=shapes))
    assert (other / "sft.json").read_bytes() != (omitting / "sft.json").read_bytes()
    with pytest.raises(ValueError, match="sft_description_omission"):
        write_synthetic_dataset(tmp_path / "bad", SynthConfig(num=4, sft_description_omission=-0.1))


def test_omission_rate_zero_and_one(tmp_path, shapes):
    """At 0 every SFT description is complete; at 1 every one of a scene with 2+ groups omits its last group."""
    for rate in (0.0, 1.0):
        out = tmp_path / str(rate)
        write_synthetic_dataset(out, SynthConfig(num=8, num_sft=64, seed=3, sft_description_omission=rate,
                                                 describe_shapes=shapes))
        scenes = _load(out, "scenes.json")
        for rec in _load(out, "sft.json"):
            full = _description(scenes[rec["images"][0]]["objects"], shapes)
            groups = full.rstrip(".").split(", ")
            got = _description_line(rec["messages"][1]["content"])
            assert got == (", ".join(groups[:-1]) + "." if rate == 1.0 and len(groups) > 1 else full), (rate, full, got)


def test_images_pass_the_image_pipeline(dataset):
    grpo = _load(dataset, "grpo.json")[:4]
    out = PilImageDecoder(ImageConfig()).decode_and_preprocess([dataset / r["images"][0] for r in grpo])
    assert out.image_grid_thw.tolist() == [[1, 8, 8]] * 4  # 112 x 112 -> 8 x 8 patches, 16 LLM tokens


def test_cli_synth_and_bad_sizes(tmp_path, capsys):
    assert cli_main(["synth", "--out", str(tmp_path / "d"), "--num", "5", "--num-eval", "3", "--width", "168"]) == 0
    assert "grpo 5, sft 5, eval 3" in capsys.readouterr().out
    assert Image.open(tmp_path / "d" / "images" / "grpo_00000.png").size == (168, 112)
    assert cli_main(["synth", "--out", str(tmp_path / "e"), "--height", "20"]) == 2
    assert ">= 28 px" in capsys.readouterr().err
    assert cli_main(["synth", "--out", str(tmp_path / "e"), "--max-objects", "40"]) == 2
    assert cli_main(["synth", "--out", str(tmp_path / "e"), "--sft-teacher-error", "1.5"]) == 2
    assert "sft_teacher_error must be in [0, 1]" in capsys.readouterr().err
    assert cli_main(["synth", "--out", str(tmp_path / "e"), "--sft-description-omission", "2"]) == 2
    assert "sft_description_omission must be in [0, 1]" in capsys.readouterr().err
    assert cli_main(["synth", "--out", str(tmp_path / "f"), "--num", "4", "--sft-description-omission", "1"]) == 0


def test_tokenizer_corpus_covers_the_synthetic_vocabulary(dataset):
    from pebr_mega.data.corpus import tokenizer_corpus, vocabulary
    from pebr_mega.models.tiny import train_tokenizer

    tok = train_tokenizer(tokenizer_corpus(), 1024)
    for word in vocabulary():
        assert len(tok.tokenize(" " + word)) == 1, word
    response = _load(dataset, "sft.json")[0]["messages"][1]["content"]
    assert len(tok(response)["input_ids"]) < len(response) / 2.5


def _single_errors(truth: Counter, shapes: bool) -> list[Counter]:
    """Every scene description one perception error away from `truth` ((colour, noun) -> count), enumerated
    directly: one count +-1 (absent groups included), or one group's colour or (where named) shape replaced."""
    out = []
    for c in COLORS:
        for s in _nouns(shapes):
            for step in (-1, 1):
                n = truth[(c, s)] + step
                if n >= 0:
                    out.append(Counter({**truth, (c, s): n}))
    for (c, s), n in truth.items():
        for c2 in COLORS:
            if c2 != c:
                out.append(Counter({**truth, (c, s): 0}) + Counter({(c2, s): n}))
        for s2 in SHAPES if shapes else ():
            if s2 != s:
                out.append(Counter({**truth, (c, s): 0}) + Counter({(c, s2): n}))
    return [+x for x in out if +x != +truth and sum(x.values())]


def test_hard_negatives_differ_by_one_perception_error_and_are_deterministic(dataset, shapes):
    import random

    from pebr_mega.data.synthetic import (COLORS, EXTRA_KIND, OMIT_KIND, describe_scene, hard_negatives, load_scenes,
                                          nouns)
    from pebr_mega.rewards.perception import description_groups

    def counts(text: str) -> Counter:
        groups = description_groups(text)
        assert groups.unparsed == 0, text
        return Counter({tuple(phrase.split()): n for (n, phrase), k in groups.groups.items() for _ in range(k)})

    scenes = load_scenes(dataset, "grpo")
    assert len(scenes) == 48 and all(k.startswith("images/grpo_") for k in scenes)
    rng = random.Random(0)
    kinds = Counter()
    for scene in scenes.values():
        true_text = describe_scene(scene, shapes)
        truth = counts(true_text)
        negatives = hard_negatives(scene, rng, 6, shapes=shapes)
        assert len(negatives) == len(set(negatives)) >= 4 and true_text not in negatives
        allowed = _single_errors(truth, shapes)
        for text in negatives:
            got = counts(text)
            assert got in allowed, (true_text, text)
            kinds["count" if sum(got.values()) != sum(truth.values()) or set(got) == set(truth) else "swap"] += 1
    assert kinds["count"] > 20 and kinds["swap"] > 20
    # "omit" alone: the description without one whole group; none for a scene of one group
    for scene in scenes.values():
        truth = counts(describe_scene(scene, shapes))
        omitted = hard_negatives(scene, rng, 4, (OMIT_KIND,), shapes)
        assert len(omitted) == (min(4, len(truth)) if len(truth) > 1 else 0), (truth, omitted)
        for text in omitted:
            got = counts(text)
            assert len(got) == len(truth) - 1 and all(truth[k] == v for k, v in got.items())
    # "extra" alone: the description with one group of 1 or 2 that the scene does not have; none when the scene
    # holds every group of its world
    every = len(COLORS) * len(nouns(shapes))
    for scene in scenes.values():
        truth = counts(describe_scene(scene, shapes))
        added = hard_negatives(scene, rng, 2, (EXTRA_KIND,), shapes)
        assert (len(added) == 0) == (len(truth) == every), (truth, added)
        for text in added:
            got = counts(text)
            (new,) = set(got) - set(truth)
            assert len(got) == len(truth) + 1 and got[new] in (1, 2) and all(got[k] == v for k, v in truth.items())
    again = hard_negatives(next(iter(scenes.values())), random.Random(3), 5, shapes=shapes)
    assert again == hard_negatives(next(iter(scenes.values())), random.Random(3), 5, shapes=shapes)
    if not shapes:
        with pytest.raises(ValueError, match="unknown perception error kind 'shape'"):
            hard_negatives(next(iter(scenes.values())), random.Random(3), 5, ("shape",))


def test_the_world_naming_shapes_writes_the_records_it_wrote_before_the_colour_and_count_world(tmp_path):
    """`describe_shapes=True` is the earlier demo's world unchanged: the records (not the PNGs, whose bytes
    depend on zlib) hash as they did at 2eef13f, before the colour-and-count world was added."""
    write_synthetic_dataset(tmp_path, SynthConfig(num=48, num_sft=96, seed=7, sft_teacher_error=0.6,
                                                  describe_shapes=True))
    h = hashlib.sha256()
    for name in ("grpo.json", "sft.json", "eval.json", "scenes.json"):
        h.update((tmp_path / name).read_bytes())
    assert h.hexdigest() == "b03a904e721624a6e31a566b6c135329019429c8d71b95b29943e38eff101419"


def test_the_world_with_repeated_colours_writes_the_records_it_wrote_before_distinct_colours(tmp_path):
    """`distinct_colors=False` keeps the colour-and-count world's scenes (the random draws keep their order): the
    records hash as they did at 23e68d0, before `distinct_colors` was added."""
    write_synthetic_dataset(tmp_path, SynthConfig(num=48, num_sft=96, seed=7, sft_teacher_error=0.6,
                                                  sft_description_omission=0.5))
    h = hashlib.sha256()
    for name in ("grpo.json", "sft.json", "eval.json", "scenes.json"):
        h.update((tmp_path / name).read_bytes())
    assert h.hexdigest() == "abff50da508bb8ee26bd2deff8408566e158557f036b5b31842d99caffb69609"


def test_distinct_colours_give_every_object_its_own_colour(tmp_path):
    """`distinct_colors`: every scene's objects have different colours, so every described group is one object
    and the counts in the answers are those of the scene; more objects than colours is refused by name."""
    from pebr_mega.data.synthetic import load_scenes
    from pebr_mega.rewards.perception import description_groups

    cfg = SynthConfig(num=64, num_sft=64, seed=3, max_objects=4, distinct_colors=True, sft_description_omission=0.5)
    write_synthetic_dataset(tmp_path / "d", cfg)
    scenes = load_scenes(tmp_path / "d")
    sizes = Counter(len(s.objects) for s in scenes.values())
    assert set(sizes) == {1, 2, 3, 4}, sizes
    for scene in scenes.values():
        colors = [o.color for o in scene.objects]
        assert len(colors) == len(set(colors)), colors
    for name in ("grpo.json", "eval.json"):
        for rec in json.loads((tmp_path / "d" / name).read_text()):
            groups = description_groups(rec["description"]).groups
            assert groups and all(n == 1 for n, _ in groups), rec["description"]
            assert sum(groups.values()) == len(scenes[rec["images"][0]].objects)
    with pytest.raises(ValueError, match="distinct_colors .* max_objects must be at most 4"):
        write_synthetic_dataset(tmp_path / "bad", SynthConfig(num=4, max_objects=5, distinct_colors=True))
    assert cli_main(["synth", "--out", str(tmp_path / "c"), "--num", "8", "--max-objects", "4",
                     "--distinct-colors"]) == 0
    assert all(len({o.color for o in s.objects}) == len(s.objects) for s in load_scenes(tmp_path / "c").values())
