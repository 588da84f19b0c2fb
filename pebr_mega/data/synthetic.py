"""A synthetic shapes dataset for the embedded demo: images, GRPO questions, PeBR-format SFT answers, eval set.

Each image holds 1-6 flat-coloured circles, squares and triangles (4 colours) on a light background, one per
cell of a grid so they never overlap. Each image gets one question, from perception ("How many red objects
are there?") to CLEVR-style reasoning ("Remove all blue objects. How many objects are left?", "How many more
red objects than green objects are there?"). Answers are a count 0-6 or a colour word, so a ~1 M-parameter
model can learn part of it.

Two worlds, chosen by `SynthConfig.describe_shapes`:

- colour and count (the default): descriptions, questions and key words name colours and counts only ("2 red
  objects, 1 blue object."); the shapes are still drawn, as distractors. It is the world the demo's tiny model
  can perceive: at seed 0 its language side never learnt to name shapes within the demo's budget (the named
  shape was independent of the true one, Cramer's V 0.01-0.03, although a linear probe of the frozen vision
  tower reads shape perfectly), so "exact" descriptions that name shapes were shape luck (docs/DEMO.md).
- colour, shape and count (`describe_shapes=True`): "2 red circles, 1 blue square.", with shape questions
  ("What color is the square?", "How many circles are there?") too.

`write_synthetic_dataset(out_dir, cfg)` writes

    images/<split>_<i>.png    one image per question (never shared between splits)
    grpo.json                 GRPO records: qid, problem (one "<image>"), answer, images, key_words (the groups
                              the question is about, with counts: "2 red circles"), description
    sft.json                  ShareGPT records: user turn = PeBR instruction + problem, assistant turn = a
                              PeBR-format response (description, rationale, 1-3 steps, answer), correct unless
                              the teacher is made sloppy: `cfg.sft_teacher_error` (reasoning answers one off)
                              or `cfg.sft_description_omission` (a description missing its last group, with
                              the counting that follows from it); images
    eval.json                 held-out GRPO records (their own images and qids)
    scenes.json               the generator's scene per image: size and objects (shape, color, x, y, size)

Everything derives from `cfg.seed` through `random.Random`, and PIL writes PNGs deterministically, so the
same config gives byte-identical files.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

from pebr_mega.data.template import IMAGE_TOKEN, build_prompt_text, format_response
from pebr_mega.errors import DataError

# Colours far apart in RGB, so the (tiny) vision tower can tell them apart after bicubic resizing.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND = (245, 245, 245)

OBJECT = "object"  # the noun of every group when shapes are not named

PERCEPTION_KINDS = ("count_color", "count_shape", "count_color_shape", "count_total", "color_of_only")
REASONING_KINDS = ("remove_color", "remove_shape", "more_than")
QUESTION_KINDS = PERCEPTION_KINDS + REASONING_KINDS
SHAPE_KINDS = ("count_shape", "count_color_shape", "color_of_only", "remove_shape")  # need shapes named


def question_kinds(shapes: bool) -> tuple[str, ...]:
    """The question kinds of a world: all of them when shapes are named, else those about colours and counts."""
    return QUESTION_KINDS if shapes else tuple(k for k in QUESTION_KINDS if k not in SHAPE_KINDS)


def nouns(shapes: bool) -> tuple[str, ...]:
    """The nouns a description's groups use: the shapes, or "object" alone when shapes are not named."""
    return SHAPES if shapes else (OBJECT,)

# Every word the questions and responses use besides colours, shapes and numbers (the tokenizer corpus's list).
WORDS = ("how many are there what color is the remove all objects object left more than need to count "
         "only total minus number of in image ones none i it").split()

QUESTION_CANDIDATES = 4  # questions drawn per image; the one with the rarest answer so far is kept


def plural(shape: str, n: int = 2) -> str:
    """`shape` in the singular for n == 1, else the plural ("circle" / "circles")."""
    return shape if n == 1 else shape + "s"


@dataclass
class SynthConfig:
    """Sizes and seed of the synthetic dataset."""

    num: int = 256  # GRPO questions
    num_sft: int | None = None  # SFT examples; None = num
    num_eval: int | None = None  # held-out questions; None = max(32, num // 4)
    seed: int = 0
    width: int = 112
    height: int = 112
    min_objects: int = 1
    max_objects: int = 6
    # A sloppy SFT teacher, as distilled SFT data has: on reasoning questions ("remove", "more than"), this
    # fraction of the SFT answers ends one above what the teacher's own last step computed. The GRPO and
    # held-out answers stay correct, so RL's verifiable reward can undo what SFT learnt from the teacher.
    sft_teacher_error: float = 0.0
    # A teacher whose descriptions are incomplete, as distilled captions often are: this fraction of the SFT
    # responses (of scenes with two groups or more) describe the image without its last group ("2 red circles."
    # for "2 red circles, 1 blue square."); rationale, steps and answer stay right. The GRPO and held-out records
    # keep the full description, so the perception rewards of stage 1 can undo the habit. The teacher counts what
    # it described: on "How many objects" and "Remove" questions its steps and answer leave the group out too, so
    # the habit costs answers and fixing perception helps reasoning.
    sft_description_omission: float = 0.0
    # Name shapes in descriptions, questions and key words (the module docstring's two worlds).
    describe_shapes: bool = False
    # Every object of a scene has its own colour (so at most len(COLORS) objects): the colour groups are single
    # objects, "1 red object, 1 blue object.". The demo's world: the tiny model does not learn to count objects
    # of one colour within its budget (docs/DEMO.md), so groups of 2+ would only be errors it cannot fix.
    distinct_colors: bool = False

    def split_sizes(self) -> dict[str, int]:
        """Examples per split, with the defaults resolved."""
        for key in ("sft_teacher_error", "sft_description_omission"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if self.distinct_colors and self.max_objects > len(COLORS):
            raise ValueError(f"distinct_colors gives every object its own colour: max_objects must be at most "
                             f"{len(COLORS)} (the colours), got {self.max_objects}")
        sizes = {"grpo": self.num,
                 "sft": self.num if self.num_sft is None else self.num_sft,
                 "eval": max(32, self.num // 4) if self.num_eval is None else self.num_eval}
        for split, n in sizes.items():
            if n < 0:
                raise ValueError(f"the {split} split cannot have {n} examples")
        return sizes


@dataclass
class SceneObject:
    """One shape: its centre (x, y) and half-size in pixels."""

    shape: str
    color: str
    x: int
    y: int
    size: int


@dataclass
class Scene:
    """What an image shows."""

    width: int
    height: int
    objects: list[SceneObject] = field(default_factory=list)

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        """Objects matching `color` and `shape` (None matches any)."""
        return sum(1 for o in self.objects if color in (None, o.color) and shape in (None, o.shape))


@dataclass
class Question:
    """A question about a scene, its answer and the reasoning a correct PeBR response gives."""

    kind: str
    problem: str  # contains IMAGE_TOKEN exactly once
    answer: str
    rationale: str
    steps: list[str]
    key_words: list[str]
    subject: str = ""  # what a "remove" question removes (a colour or a shape)


@dataclass
class Example:
    """One image with its question."""

    split: str
    index: int
    scene: Scene
    question: Question
    png: bytes
    shapes: bool = False  # the world's `describe_shapes`

    @property
    def qid(self) -> str:
        return f"{self.split}-{self.index:05d}"

    @property
    def image_path(self) -> str:
        return f"images/{self.split}_{self.index:05d}.png"


# ---------------------------------------------------------------------------------------------- scenes
def _geometry(cfg: SynthConfig) -> tuple[int, int, int, int, int, int]:
    """(object half-size, cell size, columns, rows, x offset, y offset) of the placement grid."""
    half = max(5, min(cfg.width, cfg.height) // 10)
    cell = 2 * half + 6  # 3 px of jitter and gap on each side
    cols, rows = cfg.width // cell, cfg.height // cell
    if min(cfg.width, cfg.height) < 28:
        raise ValueError(f"image size {cfg.width}x{cfg.height}: both sides must be >= 28 px (the data rules)")
    if cfg.min_objects < 1 or cfg.max_objects < cfg.min_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {cfg.min_objects}..{cfg.max_objects}")
    if cols * rows < cfg.max_objects:
        raise ValueError(f"a {cfg.width}x{cfg.height} image has room for {cols * rows} objects, fewer than "
                         f"max_objects = {cfg.max_objects}; make the image larger")
    return half, cell, cols, rows, (cfg.width - cols * cell) // 2, (cfg.height - rows * cell) // 2


def sample_scene(rng: random.Random, cfg: SynthConfig) -> Scene:
    """A random scene: min..max objects, each alone in a grid cell (so none overlap), jittered in it; with
    `cfg.distinct_colors`, each of its own colour."""
    half, cell, cols, rows, x0, y0 = _geometry(cfg)
    jitter = (cell - 2 * half) // 2 - 1
    scene = Scene(cfg.width, cfg.height)
    cells = sorted(rng.sample(range(cols * rows), rng.randint(cfg.min_objects, cfg.max_objects)))
    colors = rng.sample(list(COLORS), len(cells)) if cfg.distinct_colors else None
    for i, c in enumerate(cells):
        cx = x0 + (c % cols) * cell + cell // 2 + rng.randint(-jitter, jitter)
        cy = y0 + (c // cols) * cell + cell // 2 + rng.randint(-jitter, jitter)
        shape = rng.choice(SHAPES)  # drawn before the colour: the other worlds' scenes stay as they were
        color = colors[i] if colors else rng.choice(list(COLORS))
        scene.objects.append(SceneObject(shape, color, cx, cy, half))
    return scene


def render_scene(scene: Scene) -> Image.Image:
    """The scene as an RGB image: flat colours, no antialiasing (every pixel is the background or a colour)."""
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((o.x - o.size, o.y - o.size, o.x + o.size, o.y + o.size), fill=fill)
        elif o.shape == "square":
            side = round(o.size * 0.85)  # a square of the circle's area looks about as large
            draw.rectangle((o.x - side, o.y - side, o.x + side, o.y + side), fill=fill)
        else:
            draw.polygon([(o.x, o.y - o.size), (o.x - o.size, o.y + o.size), (o.x + o.size, o.y + o.size)], fill=fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding without metadata (deterministic for the same pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _groups(scene: Scene, color: str | None = None, shape: str | None = None,
            shapes: bool = True) -> list[tuple[int, str, str]]:
    """(count, colour, noun) of the matching objects, in the fixed colour then noun order; the noun is the shape,
    or "object" for every group when `shapes` is False (one group per colour)."""
    counts = Counter((o.color, o.shape if shapes else OBJECT) for o in scene.objects
                     if color in (None, o.color) and shape in (None, o.shape))
    return [(counts[(c, s)], c, s) for c in COLORS for s in nouns(shapes) if counts[(c, s)]]


def _list_groups(groups: list[tuple[int, str, str]]) -> str:
    return ", ".join(f"{n} {c} {plural(s, n)}" for n, c, s in groups) or "none"


def describe_scene(scene: Scene, shapes: bool = False) -> str:
    """The reference description: "2 red objects, 1 blue object." (or, naming shapes, "2 red circles, 1 blue
    square.")."""
    return describe_groups(_groups(scene, shapes=shapes))


def describe_groups(groups: list[tuple[int, str, str]]) -> str:
    """(count, colour, noun) groups as a description in the fixed colour then noun order."""
    counts = Counter()
    for n, c, s in groups:
        counts[(c, s)] += n
    order = (*SHAPES, OBJECT)
    return _list_groups([(counts[(c, s)], c, s) for c in COLORS for s in order if counts[(c, s)] > 0]) + "."


OMIT_KIND = "omit"  # a whole group left out: the omitting teacher's error (`SynthConfig.sft_description_omission`)
EXTRA_KIND = "extra"  # a group that is not there added: the overcorrection of a model taught not to omit


def hard_negative_kinds(shapes: bool) -> tuple[str, ...]:
    """The perception errors a world's descriptions can have besides omission: a count, a colour, a shape when
    shapes are named."""
    return ("count", "color", "shape") if shapes else ("count", "color")


def perturb_groups(groups: list[tuple[int, str, str]], rng: random.Random, kind: str,
                   shapes: bool = False) -> list[tuple[int, str, str]]:
    """The groups with one perception error of `kind`: one count one off ("count": a count +-1, which may drop a
    group or add an absent one as 1), one group's colour ("color") or shape ("shape", when `shapes`) replaced,
    one whole group left out ("omit": an incomplete description; a scene of one group is returned unchanged), or
    a group of 1 or 2 that is not in the scene added ("extra"; a scene holding every group is returned
    unchanged)."""
    groups = list(groups)
    known = (*hard_negative_kinds(shapes), OMIT_KIND, EXTRA_KIND)
    if kind not in known:
        raise ValueError(f"unknown perception error kind {kind!r}; known: {known}")
    if kind == OMIT_KIND:
        if len(groups) > 1:
            del groups[rng.randrange(len(groups))]
        return groups
    present = {(c, s) for _, c, s in groups}
    absent = [(c, s) for c in COLORS for s in nouns(shapes) if (c, s) not in present]
    if kind == EXTRA_KIND:
        if absent:
            c, s = rng.choice(absent)
            groups.append((rng.choice([1, 2]), c, s))
        return groups
    if kind == "count":
        if absent and rng.random() < 0.25:
            c, s = rng.choice(absent)
            return groups + [(1, c, s)]
        i = rng.randrange(len(groups))
        n, c, s = groups[i]
        step = rng.choice([-1, 1]) if len(groups) > 1 or n > 1 else 1
        groups[i] = (n + step, c, s)
        return [g for g in groups if g[0] > 0]
    i = rng.randrange(len(groups))
    n, c, s = groups[i]
    if kind == "color":
        groups[i] = (n, rng.choice([x for x in COLORS if x != c]), s)
    else:
        groups[i] = (n, c, rng.choice([x for x in SHAPES if x != s]))
    return groups


def hard_negatives(scene: Scene, rng: random.Random, k: int, kinds: tuple[str, ...] | None = None,
                   shapes: bool = False) -> list[str]:
    """Up to `k` distinct descriptions that differ from the scene's by one perception error (`perturb_groups`) of
    `kinds` (default: the world's `hard_negative_kinds`)."""
    kinds = tuple(kinds or hard_negative_kinds(shapes))
    truth = _groups(scene, shapes=shapes)
    true_text = describe_groups(truth)
    out: list[str] = []
    for _ in range(8 * k):
        if len(out) == k:
            break
        text = describe_groups(perturb_groups(truth, rng, rng.choice(kinds), shapes))
        if text != true_text and text not in out:
            out.append(text)
    return out


def scene_from_dict(d: dict) -> Scene:
    """A `Scene` from its `scenes.json` entry."""
    return Scene(d["width"], d["height"], [SceneObject(**o) for o in d["objects"]])


def load_scenes(data_dir: str | Path, split: str | None = None) -> dict[str, Scene]:
    """The scenes of a written dataset (`scenes.json`), by image path; only `split`'s when given."""
    path = Path(data_dir) / "scenes.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the synthetic scenes {path}: {e}") from None
    return {k: scene_from_dict(v) for k, v in raw.items()
            if split is None or Path(k).name.startswith(f"{split}_")}


def _key_words(groups: list[tuple[int, str, str]]) -> list[str]:
    """The groups the question is about, with their counts as the description states them ("2 red circles"), so
    that the keyword reward checks what was seen, not only which words were used."""
    return [f"{n} {c} {plural(s, n)}" for n, c, s in groups]


# ---------------------------------------------------------------------------------------------- questions
def _count_steps(target: str, groups: list[tuple[int, str, str]]) -> list[str]:
    total = sum(n for n, _, _ in groups)
    listing = f"{target.capitalize()}: {_list_groups(groups)}."
    if len(groups) > 1:
        return [listing, f"Total: {' + '.join(str(n) for n, _, _ in groups)} = {total}."]
    return [listing, f"Total: {total}."]


def _attribute(rng: random.Random, present: list[str], every: list[str]) -> str:
    # Mostly ask about what is there; sometimes about what is not (answer 0), so "0" is learnt too.
    return rng.choice(present) if present and rng.random() < 0.8 else rng.choice(every)


def applicable_kinds(scene: Scene, shapes: bool = False) -> list[str]:
    """The question kinds of the world that make sense for `scene` ("What color is the X?" needs exactly one X)."""
    return [k for k in question_kinds(shapes)
            if k != "color_of_only" or any(scene.count(shape=s) == 1 for s in SHAPES)]


def _remove_question(scene: Scene, kind: str, subject: str, shapes: bool) -> Question:
    """ "Remove all <subject>. How many objects are left?" worked out on `scene`."""
    total = len(scene.objects)
    if kind == "remove_color":
        removed, what, ones = scene.count(color=subject), f"{subject} objects", f"the {subject} ones"
    else:
        removed, what, ones = scene.count(shape=subject), plural(subject), f"the {plural(subject)}"
    left = total - removed
    return Question(kind, f"Remove all {what}. How many objects are left?", str(left),
                    f"I need all objects minus {ones}.",
                    [f"Objects: {total}.", f"{what.capitalize()}: {removed}.", f"{total} - {removed} = {left}."],
                    _key_words(_groups(scene, shapes=shapes)), subject)


def _count_color_question(scene: Scene, color: str, shapes: bool) -> Question:
    groups = _groups(scene, color=color, shapes=shapes)
    return Question("count_color", f"How many {color} objects are there?", str(scene.count(color=color)),
                    f"I need to count the {color} objects.", _count_steps(f"{color} objects", groups),
                    _key_words(groups) or [color], color)


def _count_total_question(scene: Scene, shapes: bool) -> Question:
    everything = _groups(scene, shapes=shapes)
    return Question("count_total", "How many objects are there?", str(len(scene.objects)),
                    "I need to count all the objects.", _count_steps("objects", everything), _key_words(everything))


def make_question(scene: Scene, rng: random.Random, kind: str | None = None, shapes: bool = False) -> Question:
    """A random question about `scene` (of `kind`, or a random applicable one of the world) with its worked
    answer; `shapes` names shapes (the module docstring's worlds)."""
    colors = [c for c in COLORS if scene.count(color=c)]
    present_shapes = [s for s in SHAPES if scene.count(shape=s)]
    only = [s for s in SHAPES if scene.count(shape=s) == 1]
    applicable = applicable_kinds(scene, shapes)
    kind = kind or rng.choice(applicable)
    if kind not in applicable:
        raise ValueError(f"question kind {kind!r} does not apply to this scene in this world "
                         f"(known: {question_kinds(shapes)})")
    everything = _groups(scene, shapes=shapes)

    if kind == "count_color":
        return _count_color_question(scene, _attribute(rng, colors, list(COLORS)), shapes)
    if kind == "count_shape":
        s = _attribute(rng, present_shapes, list(SHAPES))
        groups = _groups(scene, shape=s)
        return Question(kind, f"How many {plural(s)} are there?", str(scene.count(shape=s)),
                        f"I need to count the {plural(s)}.", _count_steps(plural(s), groups), _key_words(groups) or [s])
    if kind == "count_color_shape":
        # Mostly a (colour, shape) pair that is there; sometimes any pair (often absent: answer 0).
        _, c, s = rng.choice(everything) if rng.random() < 0.8 else (0, rng.choice(list(COLORS)), rng.choice(SHAPES))
        n = scene.count(color=c, shape=s)
        return Question(kind, f"How many {c} {plural(s)} are there?", str(n),
                        f"I need to count the {c} {plural(s)}.", [f"{c.capitalize()} {plural(s)}: {n}."],
                        _key_words([(n, c, s)] if n else []) or [c, s])
    if kind == "count_total":
        return _count_total_question(scene, shapes)
    if kind == "color_of_only":
        s = rng.choice(only)
        (obj,) = [o for o in scene.objects if o.shape == s]
        return Question(kind, f"What color is the {s}?", obj.color, f"I need the color of the only {s}.",
                        [f"The only {s} is {obj.color}."], _key_words([(1, obj.color, s)]))
    if kind == "remove_color":
        return _remove_question(scene, kind, _attribute(rng, colors, list(COLORS)), shapes)
    if kind == "remove_shape":
        return _remove_question(scene, kind, _attribute(rng, present_shapes, list(SHAPES)), shapes)
    if kind == "more_than":
        if rng.random() < 0.5 or not shapes:
            a, b = rng.sample(list(COLORS), 2)
            (na, xa), (nb, xb) = (scene.count(color=a), f"{a} objects"), (scene.count(color=b), f"{b} objects")
            groups = _groups(scene, color=a, shapes=shapes) + _groups(scene, color=b, shapes=shapes)
        else:
            a, b = rng.sample(list(SHAPES), 2)
            (na, xa), (nb, xb) = (scene.count(shape=a), plural(a)), (scene.count(shape=b), plural(b))
            groups = _groups(scene, shape=a) + _groups(scene, shape=b)
        if na < nb:  # ask "how many more" of the larger group, so the answer is >= 0
            (na, xa), (nb, xb) = (nb, xb), (na, xa)
        words = _key_words(groups) or [a, b]
        return Question(kind, f"How many more {xa} than {xb} are there?", str(na - nb),
                        f"I need the number of {xa} minus the number of {xb}.",
                        [f"{xa.capitalize()}: {na}.", f"{xb.capitalize()}: {nb}.", f"{na} - {nb} = {na - nb}."], words)
    raise ValueError(f"unknown question kind {kind!r}; known: {QUESTION_KINDS}")


def sft_response(scene: Scene, question: Question, answer: str | None = None, description: str | None = None,
                 shapes: bool = False) -> str:
    """The PeBR-format response to `question`: correct, or ending in `answer` instead of the right one, or
    describing the image as `description` instead of the scene's full description."""
    return format_response(describe_scene(scene, shapes) if description is None else description,
                           question.rationale, question.steps, question.answer if answer is None else answer)


def without_last_group(scene: Scene, shapes: bool = False) -> Scene:
    """The scene as a teacher that leaves out the last group its description lists sees it: without that group's
    objects ("2 red objects." for "2 red objects, 1 blue object."); a scene of one group is seen whole."""
    groups = _groups(scene, shapes=shapes)
    if len(groups) < 2:
        return scene
    _, color, noun = groups[-1]
    kept = [o for o in scene.objects if not (o.color == color and noun in (OBJECT, o.shape))]
    return Scene(scene.width, scene.height, kept)


def answered_from(question: Question, seen: Scene, shapes: bool = False) -> Question:
    """`question` (same words) worked out on the scene as the teacher saw it: a counting question ("How many
    (red) objects", "Remove all ...") counts only what `seen` holds; the other kinds are
    returned as they are (the teacher looked at the groups they compare or name)."""
    if question.kind == "count_color":
        return replace(_count_color_question(seen, question.subject, shapes), key_words=question.key_words)
    if question.kind == "count_total":
        return replace(_count_total_question(seen, shapes), key_words=question.key_words)
    if question.kind in ("remove_color", "remove_shape"):
        return replace(_remove_question(seen, question.kind, question.subject, shapes), key_words=question.key_words)
    return question


# ---------------------------------------------------------------------------------------------- records
def grpo_record(example: Example) -> dict:
    """The example as a GRPO record (plus the reference `description`)."""
    q = example.question
    return {"qid": example.qid, "problem": IMAGE_TOKEN + q.problem, "answer": q.answer,
            "images": [example.image_path], "key_words": q.key_words,
            "description": describe_scene(example.scene, example.shapes)}


def teacher_response(example: Example, error_rate: float, seed: int, omission: float = 0.0) -> str:
    """The SFT teacher's response: correct, except that on reasoning questions, with probability
    `error_rate` (drawn per example from `seed` and the qid), the final answer is one above its last step, and
    that with probability `omission` (drawn independently, the same way) the teacher overlooks the last group
    it would list (`without_last_group`; scenes of one group are always seen whole): its description leaves the
    group out, and so do its steps and answer on counting questions (`answered_from`)."""
    q, scene = example.question, example.scene
    wrong = (q.kind in REASONING_KINDS
             and random.Random(f"pebr-synth/{seed}/teacher/{example.qid}").random() < error_rate)
    omits = random.Random(f"pebr-synth/{seed}/omission/{example.qid}").random() < omission
    seen = without_last_group(scene, example.shapes) if omits else scene
    if seen is not scene:
        q = answered_from(q, seen, example.shapes)
    return sft_response(seen, q, str(int(q.answer) + 1) if wrong else None, shapes=example.shapes)


def sft_record(example: Example, teacher_error: float = 0.0, seed: int = 0, omission: float = 0.0) -> dict:
    """The example as a ShareGPT record whose assistant turn is the teacher's PeBR response (`teacher_response`)."""
    user = build_prompt_text(IMAGE_TOKEN + example.question.problem)
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": teacher_response(example, teacher_error, seed, omission)}],
            "images": [example.image_path]}


def _split_rng(seed: int, split: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across runs and Python versions.
    return random.Random(f"pebr-synth/{seed}/{split}")


def generate_split(split: str, count: int, cfg: SynthConfig, seen: set[str], render: bool = True) -> list[Example]:
    """`count` examples for `split`, skipping any scene whose image is already in `seen` (which grows).

    With `render=False` no image is drawn (for text-only uses such as the tokenizer corpus); duplicates are then
    detected on the scene itself.
    """
    rng = _split_rng(cfg.seed, split)
    examples: list[Example] = []
    answers: Counter[str] = Counter()
    tries = 0
    while len(examples) < count:
        tries += 1
        if tries > 20 * count + 100:
            raise ValueError(f"could only make {len(examples)} distinct {split} images of {count}; "
                             f"allow more objects or a larger image")
        scene = sample_scene(rng, cfg)
        png = png_bytes(render_scene(scene)) if render else b""
        key = hashlib.sha256(png or json.dumps(asdict(scene)).encode()).hexdigest()
        if key in seen:
            continue
        seen.add(key)
        # Small counts dominate random questions ("1" would be right ~40% of the time): of a few candidate
        # questions of one kind, keep the one whose answer is rarest so far, which flattens the answer
        # distribution while keeping the kinds balanced.
        kind = rng.choice(applicable_kinds(scene, cfg.describe_shapes))
        candidates = [make_question(scene, rng, kind, cfg.describe_shapes) for _ in range(QUESTION_CANDIDATES)]
        question = min(candidates, key=lambda q: answers[q.answer])
        answers[question.answer] += 1
        examples.append(Example(split, len(examples), scene, question, png, cfg.describe_shapes))
    return examples


@dataclass
class SynthSummary:
    """What `write_synthetic_dataset` wrote."""

    out_dir: Path
    counts: dict[str, int]
    kinds: dict[str, int]  # questions per kind, all splits together

    def __str__(self) -> str:
        sizes = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        return f"wrote synthetic dataset to {self.out_dir}: {sizes} (question kinds: {dict(self.kinds)})"


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_synthetic_dataset(out_dir: str | Path, cfg: SynthConfig) -> SynthSummary:
    """Render and write the dataset (see the module docstring) to `out_dir`; returns what was written."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    splits = {split: generate_split(split, n, cfg, seen) for split, n in cfg.split_sizes().items()}
    scenes = {}
    for examples in splits.values():
        for ex in examples:
            (out / ex.image_path).write_bytes(ex.png)
            scenes[ex.image_path] = asdict(ex.scene)
    _write_json(out / "grpo.json", [grpo_record(ex) for ex in splits["grpo"]])
    _write_json(out / "sft.json", [sft_record(ex, cfg.sft_teacher_error, cfg.seed, cfg.sft_description_omission)
                                   for ex in splits["sft"]])
    _write_json(out / "eval.json", [grpo_record(ex) for ex in splits["eval"]])
    _write_json(out / "scenes.json", scenes)
    kinds = Counter(ex.question.kind for examples in splits.values() for ex in examples)
    return SynthSummary(out, {s: len(e) for s, e in splits.items()}, dict(sorted(kinds.items())))


def corpus_texts(num: int = 200, seed: int = 0) -> Iterator[str]:
    """Prompts and SFT responses exactly as the dataset phrases them (no images drawn): tokenizer training text.
    From the world that names shapes, whose words include the other's (the tokenizer, and so the tiny model's
    vocabulary, stay as they were before the colour-and-count world)."""
    cfg = SynthConfig(num=num, seed=seed, describe_shapes=True)
    for ex in generate_split("sft", num, cfg, set(), render=False):
        yield IMAGE_TOKEN + ex.question.problem
        yield sft_response(ex.scene, ex.question, shapes=True)
