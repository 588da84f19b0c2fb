"""A synthetic shapes dataset for the embedded demo: images, GRPO questions, PeBR-format SFT answers, eval set.

Each image holds 1-6 flat-coloured circles, squares and triangles (4 colours) on a light background, one per
cell of a grid so they never overlap. Each image gets one question, from perception ("How many red objects
are there?", "What color is the square?") to CLEVR-style reasoning ("Remove all blue objects. How many
objects are left?", "How many more circles than squares are there?"). Answers are a count 0-6 or a colour
word, so a ~1 M-parameter model can learn part of it.

`write_synthetic_dataset(out_dir, cfg)` writes

    images/<split>_<i>.png    one image per question (never shared between splits)
    grpo.json                 GRPO records: qid, problem (one "<image>"), answer, images, key_words (the groups
                              the question is about, with counts: "2 red circles"), description
    sft.json                  ShareGPT records: user turn = PeBR instruction + problem, assistant turn = a
                              PeBR-format response (description, rationale, 1-3 steps, answer), correct unless
                              the teacher is made sloppy: `cfg.sft_teacher_error` (reasoning answers one off)
                              or `cfg.sft_description_omission` (a description missing its last group); images
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
from dataclasses import asdict, dataclass, field
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

PERCEPTION_KINDS = ("count_color", "count_shape", "count_color_shape", "count_total", "color_of_only")
REASONING_KINDS = ("remove_color", "remove_shape", "more_than")
QUESTION_KINDS = PERCEPTION_KINDS + REASONING_KINDS

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
    # keep the full description, so the perception rewards of stage 1 can undo the habit.
    sft_description_omission: float = 0.0

    def split_sizes(self) -> dict[str, int]:
        """Examples per split, with the defaults resolved."""
        for key in ("sft_teacher_error", "sft_description_omission"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be in [0, 1], got {getattr(self, key)}")
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


@dataclass
class Example:
    """One image with its question."""

    split: str
    index: int
    scene: Scene
    question: Question
    png: bytes

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
    """A random scene: min..max objects, each alone in a grid cell (so none overlap), jittered in it."""
    half, cell, cols, rows, x0, y0 = _geometry(cfg)
    jitter = (cell - 2 * half) // 2 - 1
    scene = Scene(cfg.width, cfg.height)
    for c in sorted(rng.sample(range(cols * rows), rng.randint(cfg.min_objects, cfg.max_objects))):
        cx = x0 + (c % cols) * cell + cell // 2 + rng.randint(-jitter, jitter)
        cy = y0 + (c // cols) * cell + cell // 2 + rng.randint(-jitter, jitter)
        scene.objects.append(SceneObject(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, half))
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


def _groups(scene: Scene, color: str | None = None, shape: str | None = None) -> list[tuple[int, str, str]]:
    """(count, color, shape) of the matching objects, in the fixed colour then shape order."""
    counts = Counter((o.color, o.shape) for o in scene.objects
                     if color in (None, o.color) and shape in (None, o.shape))
    return [(counts[(c, s)], c, s) for c in COLORS for s in SHAPES if counts[(c, s)]]


def _list_groups(groups: list[tuple[int, str, str]]) -> str:
    return ", ".join(f"{n} {c} {plural(s, n)}" for n, c, s in groups) or "none"


def describe_scene(scene: Scene) -> str:
    """The reference description, e.g. "2 red circles, 1 blue square."."""
    return describe_groups(_groups(scene))


def describe_groups(groups: list[tuple[int, str, str]]) -> str:
    """(count, colour, shape) groups as a description in the fixed colour then shape order."""
    counts = Counter()
    for n, c, s in groups:
        counts[(c, s)] += n
    return _list_groups([(counts[(c, s)], c, s) for c in COLORS for s in SHAPES if counts[(c, s)] > 0]) + "."


HARD_NEGATIVE_KINDS = ("count", "color", "shape")
OMIT_KIND = "omit"  # a whole group left out: the omitting teacher's error (`SynthConfig.sft_description_omission`)


def perturb_groups(groups: list[tuple[int, str, str]], rng: random.Random,
                   kind: str) -> list[tuple[int, str, str]]:
    """The groups with one perception error of `kind`: one count one off ("count": a count +-1, which may drop a
    group or add an absent one as 1), one group's colour ("color") or shape ("shape") replaced, or one whole
    group left out ("omit": an incomplete description; a scene of one group is returned unchanged)."""
    groups = list(groups)
    if kind == OMIT_KIND:
        if len(groups) > 1:
            del groups[rng.randrange(len(groups))]
        return groups
    if kind == "count":
        present = {(c, s) for _, c, s in groups}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        if absent and rng.random() < 0.25:
            c, s = rng.choice(absent)
            return groups + [(1, c, s)]
        i = rng.randrange(len(groups))
        n, c, s = groups[i]
        step = rng.choice([-1, 1]) if len(groups) > 1 or n > 1 else 1
        groups[i] = (n + step, c, s)
        return [g for g in groups if g[0] > 0]
    if kind in ("color", "shape"):
        i = rng.randrange(len(groups))
        n, c, s = groups[i]
        if kind == "color":
            groups[i] = (n, rng.choice([x for x in COLORS if x != c]), s)
        else:
            groups[i] = (n, c, rng.choice([x for x in SHAPES if x != s]))
        return groups
    raise ValueError(f"unknown perception error kind {kind!r}; known: {(*HARD_NEGATIVE_KINDS, OMIT_KIND)}")


def hard_negatives(scene: Scene, rng: random.Random, k: int,
                   kinds: tuple[str, ...] = HARD_NEGATIVE_KINDS) -> list[str]:
    """Up to `k` distinct descriptions that differ from the scene's by one perception error (`perturb_groups`)."""
    truth = _groups(scene)
    true_text = describe_groups(truth)
    out: list[str] = []
    for _ in range(8 * k):
        if len(out) == k:
            break
        text = describe_groups(perturb_groups(truth, rng, rng.choice(kinds)))
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


def applicable_kinds(scene: Scene) -> list[str]:
    """The question kinds that make sense for `scene` ("What color is the X?" needs exactly one X)."""
    return [k for k in QUESTION_KINDS if k != "color_of_only" or any(scene.count(shape=s) == 1 for s in SHAPES)]


def make_question(scene: Scene, rng: random.Random, kind: str | None = None) -> Question:
    """A random question about `scene` (of `kind`, or a random applicable one) with its worked answer."""
    colors = [c for c in COLORS if scene.count(color=c)]
    shapes = [s for s in SHAPES if scene.count(shape=s)]
    only = [s for s in SHAPES if scene.count(shape=s) == 1]
    applicable = applicable_kinds(scene)
    kind = kind or rng.choice(applicable)
    if kind not in applicable:
        raise ValueError(f"question kind {kind!r} does not apply to this scene (known: {QUESTION_KINDS})")
    total = len(scene.objects)
    everything = _groups(scene)

    if kind == "count_color":
        c = _attribute(rng, colors, list(COLORS))
        groups = _groups(scene, color=c)
        return Question(kind, f"How many {c} objects are there?", str(scene.count(color=c)),
                        f"I need to count the {c} objects.", _count_steps(f"{c} objects", groups),
                        _key_words(groups) or [c])
    if kind == "count_shape":
        s = _attribute(rng, shapes, list(SHAPES))
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
        return Question(kind, "How many objects are there?", str(total), "I need to count all the objects.",
                        _count_steps("objects", everything), _key_words(everything))
    if kind == "color_of_only":
        s = rng.choice(only)
        (obj,) = [o for o in scene.objects if o.shape == s]
        return Question(kind, f"What color is the {s}?", obj.color, f"I need the color of the only {s}.",
                        [f"The only {s} is {obj.color}."], _key_words([(1, obj.color, s)]))
    if kind in ("remove_color", "remove_shape"):
        if kind == "remove_color":
            c = _attribute(rng, colors, list(COLORS))
            removed, what, rationale = scene.count(color=c), f"{c} objects", f"all objects minus the {c} ones"
        else:
            s = _attribute(rng, shapes, list(SHAPES))
            removed, what, rationale = scene.count(shape=s), plural(s), f"all objects minus the {plural(s)}"
        return Question(kind, f"Remove all {what}. How many objects are left?", str(total - removed),
                        f"I need {rationale}.",
                        [f"Objects: {total}.", f"{what.capitalize()}: {removed}.",
                         f"{total} - {removed} = {total - removed}."], _key_words(everything))
    if kind == "more_than":
        if rng.random() < 0.5:
            a, b = rng.sample(list(COLORS), 2)
            (na, xa), (nb, xb) = (scene.count(color=a), f"{a} objects"), (scene.count(color=b), f"{b} objects")
            groups = _groups(scene, color=a) + _groups(scene, color=b)
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


def sft_response(scene: Scene, question: Question, answer: str | None = None, description: str | None = None) -> str:
    """The PeBR-format response to `question`: correct, or ending in `answer` instead of the right one, or
    describing the image as `description` instead of the scene's full description."""
    return format_response(describe_scene(scene) if description is None else description, question.rationale,
                           question.steps, question.answer if answer is None else answer)


def omit_last_group(scene: Scene) -> str:
    """The scene's description without the last group it lists ("2 red circles." for "2 red circles, 1 blue
    square."); the full description for a scene of one group."""
    groups = _groups(scene)
    return describe_groups(groups[:-1] if len(groups) > 1 else groups)


# ---------------------------------------------------------------------------------------------- records
def grpo_record(example: Example) -> dict:
    """The example as a GRPO record (plus the reference `description`)."""
    q = example.question
    return {"qid": example.qid, "problem": IMAGE_TOKEN + q.problem, "answer": q.answer,
            "images": [example.image_path], "key_words": q.key_words, "description": describe_scene(example.scene)}


def teacher_response(example: Example, error_rate: float, seed: int, omission: float = 0.0) -> str:
    """The SFT teacher's response: correct, except that on reasoning questions, with probability
    `error_rate` (drawn per example from `seed` and the qid), the final answer is one above its last step, and
    that with probability `omission` (drawn independently, the same way) the description leaves out the last
    group it would list (`omit_last_group`; scenes of one group are always described in full)."""
    q = example.question
    wrong = q.kind in REASONING_KINDS and random.Random(f"pebr-synth/{seed}/teacher/{example.qid}").random() < error_rate
    omits = random.Random(f"pebr-synth/{seed}/omission/{example.qid}").random() < omission
    return sft_response(example.scene, q, str(int(q.answer) + 1) if wrong else None,
                        omit_last_group(example.scene) if omits else None)


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
        kind = rng.choice(applicable_kinds(scene))
        candidates = [make_question(scene, rng, kind) for _ in range(QUESTION_CANDIDATES)]
        question = min(candidates, key=lambda q: answers[q.answer])
        answers[question.answer] += 1
        examples.append(Example(split, len(examples), scene, question, png))
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
    """Prompts and SFT responses exactly as the dataset phrases them (no images drawn): tokenizer training text."""
    cfg = SynthConfig(num=num, seed=seed)
    for ex in generate_split("sft", num, cfg, set(), render=False):
        yield IMAGE_TOKEN + ex.question.problem
        yield sft_response(ex.scene, ex.question)
