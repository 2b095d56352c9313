"""A procedural visual-QA task for the demo model: coloured shapes and digits.

Each sample is a 384x288 image (light background, 1-7 coloured circles / squares /
triangles at random places and sizes, optionally one dark digit) and one question whose
short answer depends on a small region of the image:

==========  ====================================  =======================
type        question                              answer
==========  ====================================  =======================
colour      What colour is the {shape}?           red, green, ... (6)
count       How many {shape}s are there?          1, 2, 3, 4
top         What shape is at the top?             circle, square, triangle
left        What colour is the leftmost shape?    red, green, ... (6)
digit       What digit is shown?                  0 ... 9
list        List the shapes from left to right.   red circle, blue square, green triangle
describe    Describe the image.                   2 shapes: red circle, blue square and digit 7
number      Read the number.                      4719 (4-5 digits, one token each)
==========  ====================================  =======================

The first five are the short types (one token with the demo tokenizer); ``list``,
``describe`` and ``number`` are the long types (task v2): 3 to 22 tokens, where every object
(or glyph) of the scene has to be read, in order. ``list`` orders the shapes by their
centres from left to right (at least ``GAP`` px apart); ``describe`` counts the shapes and
names them in a canonical order (by shape: circle, square, triangle; then by colour name),
then the digit; ``number`` is a row of 4-5 separate digit glyphs.

Answers are drawn uniformly first and the scene is built around them, so the answer
can't be guessed from the question (:func:`text_only_baseline` measures the best
question-only guess). Every answer is also re-derivable from the scene description
(:func:`derive_answer`), which the tests do independently.

Determinism: sample ``i`` of split ``name`` comes from ``numpy.random.default_rng((split
seed, i))``; digits use a built-in 5x7 bitmap font (not PIL's default font, whose glyphs
changed across Pillow versions), so images are the same on every machine. Only PIL and
numpy are used. 384x288 goes through LLaDA-V's anyres path as a 2x2 grid of 192 px crops
plus the base crop (594 visual tokens with the demo config).

The demo model's pieces that depend on the task live here too: its tokenizer
(:func:`demo_tokenizer`, every answer one token) and the per-patch labels of its
training-only vision objective (:func:`patch_labels`).

Run ``python -m llada_export.vqa_task`` for a few samples and the text-only baselines.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

WIDTH, HEIGHT = 384, 288
SPLIT_SEEDS = {"train": 1001, "val": 2002, "test": 3003}

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 155, 55),
    "blue": (35, 75, 215),
    "yellow": (230, 200, 25),
    "purple": (135, 55, 175),
    "orange": (240, 130, 25),
}
SHORT_TYPES = ("colour", "count", "top", "left", "digit")  # one-token answers (task v1)
LONG_TYPES = ("list", "describe", "number")  # several tokens (task v2)
QTYPES = SHORT_TYPES + LONG_TYPES
MAX_COUNT = 4
MAX_OBJECTS = 7
# Sizes against the demo tower's 16 px patches (one 192 px grid crop is a native-resolution quarter
# of the padded image): with glyphs of 20x28..30x42 px (scales 4-6) and shapes of 26-54 px, a tower
# trained from scratch learned neither digits nor shapes (H200 runs of 2026-12-01; a tower-only
# probe on single digits stayed at chance after 11k samples at scale 4-6, learned at 7-9).
MIN_SIZE, MAX_SIZE = 32, 60  # shape bounding-box side, px
GAP = 24  # px: the top / leftmost shape is at least this far ahead of the next one
MARGIN = 4  # px from the image border
SPACING = 6  # px between any two objects' boxes

# 5x7 bitmap glyphs (rows top to bottom, '#' = ink).
DIGIT_GLYPHS: dict[str, tuple[str, ...]] = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}
DIGIT_SCALES = (6, 7, 8)  # glyph pixel -> scale x scale px: 30x42 .. 40x56
NUMBER_SCALES = (7, 8)  # glyphs of a number: 5 of them at scale 8 with their gaps fit in 384 px
NUMBER_DIGITS = (4, 5)  # digits of a number, inclusive
LIST_SHAPES = (2, 4)  # shapes of a list scene, inclusive
DESCRIBE_SHAPES = (1, 3)  # shapes of a describe scene, inclusive (it always has a digit)


# ---------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Shape:
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    cx: int  # centre, px
    cy: int
    size: int  # side of the bounding box, px
    rgb: tuple[int, int, int]  # the drawn colour (COLOURS[colour] with a little jitter)

    @property
    def box(self) -> tuple[int, int, int, int]:
        h = self.size // 2
        return self.cx - h, self.cy - h, self.cx - h + self.size, self.cy - h + self.size


@dataclass(frozen=True)
class Digit:
    value: str  # "0".."9"
    x: int  # top-left corner, px
    y: int
    scale: int
    rgb: tuple[int, int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + 5 * self.scale, self.y + 7 * self.scale


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]
    digit: Digit | None = None
    number: tuple[Digit, ...] = ()  # a row of glyphs, left to right ("number" questions)
    width: int = WIDTH
    height: int = HEIGHT


@dataclass(frozen=True)
class Sample:
    split: str
    index: int
    qtype: str  # one of QTYPES
    arg: str | None  # the shape named in the question (colour / count), else None
    question: str  # without the "<image>\n" prefix
    answer: str
    scene: Scene = field(repr=False)

    @property
    def prompt(self) -> str:
        """The user text the model sees (the official demo form)."""
        return "<image>\n" + self.question

    def image(self) -> Image.Image:
        return render(self.scene)


def question_text(qtype: str, arg: str | None = None) -> str:
    if qtype == "colour":
        return f"What colour is the {arg}?"
    if qtype == "count":
        return f"How many {arg}s are there?"
    if qtype == "top":
        return "What shape is at the top?"
    if qtype == "left":
        return "What colour is the leftmost shape?"
    if qtype == "digit":
        return "What digit is shown?"
    if qtype == "list":
        return "List the shapes from left to right."
    if qtype == "describe":
        return "Describe the image."
    if qtype == "number":
        return "Read the number."
    raise ValueError(f"unknown question type {qtype!r}")


def all_questions(types: Sequence[str] = QTYPES) -> list[str]:
    """Every question the task can ask (of the given types)."""
    qs = [question_text("colour", s) for s in SHAPES if "colour" in types]
    qs += [question_text("count", s) for s in SHAPES if "count" in types]
    return qs + [question_text(t) for t in types if t not in ("colour", "count")]


def all_answers() -> list[str]:
    """Every answer of the short types (the long types' answers are compositions of them)."""
    return sorted(set(COLOURS) | set(SHAPES) | {str(i) for i in range(10)})


def tokenizer_corpus(repeat: int = 20) -> list[str]:
    """Training lines for the demo model's own BPE: every question of the short types, and every
    answer alone on a line (as a response starts, without a leading space), repeated so that
    whole words become single tokens. (Task v1's corpus: the shipped tokenizer was trained on it,
    and the long types reuse it, several tokens an answer.)"""
    return (all_questions(SHORT_TYPES) + all_answers()) * repeat


def list_answer(shapes: Sequence[Shape]) -> str:
    """``red circle, blue square``: the shapes by their centres from left to right."""
    return ", ".join(f"{s.colour} {s.shape}" for s in sorted(shapes, key=lambda s: s.cx))


def describe_answer(shapes: Sequence[Shape], digit: str) -> str:
    """``2 shapes: blue circle, red circle and digit 7``: the count, the shapes by shape
    (SHAPES order) then colour name, and the digit."""
    items = sorted(shapes, key=lambda s: (SHAPES.index(s.shape), s.colour))
    n = len(items)
    return f"{n} shape{'s' if n != 1 else ''}: " + ", ".join(f"{s.colour} {s.shape}" for s in items) + f" and digit {digit}"


def derive_answer(scene: Scene, qtype: str, arg: str | None = None) -> str:
    """The answer to a question, read off the scene description; ValueError when the
    scene does not determine it (the generator only makes scenes that do)."""
    if qtype == "colour":
        found = [s for s in scene.shapes if s.shape == arg]
        if len(found) != 1:
            raise ValueError(f"{len(found)} {arg}s: the colour question needs exactly one")
        return found[0].colour
    if qtype == "count":
        n = sum(s.shape == arg for s in scene.shapes)
        if not 1 <= n <= MAX_COUNT:
            raise ValueError(f"count {n} is out of range")
        return str(n)
    if qtype in ("top", "left"):
        key = (lambda s: s.cy) if qtype == "top" else (lambda s: s.cx)
        order = sorted(scene.shapes, key=key)
        if len(order) > 1 and key(order[1]) - key(order[0]) < GAP:
            raise ValueError(f"{qtype}: no clear winner")
        return order[0].shape if qtype == "top" else order[0].colour
    if qtype == "digit":
        if scene.digit is None:
            raise ValueError("no digit in the scene")
        return scene.digit.value
    if qtype == "list":
        xs = sorted(s.cx for s in scene.shapes)
        if not LIST_SHAPES[0] <= len(xs) <= LIST_SHAPES[1] or any(b - a < GAP for a, b in zip(xs, xs[1:])):
            raise ValueError("list: the shapes are not clearly ordered from left to right")
        return list_answer(scene.shapes)
    if qtype == "describe":
        if scene.digit is None or not DESCRIBE_SHAPES[0] <= len(scene.shapes) <= DESCRIBE_SHAPES[1]:
            raise ValueError("describe: needs a digit and 1-3 shapes")
        return describe_answer(scene.shapes, scene.digit.value)
    if qtype == "number":
        glyphs = sorted(scene.number, key=lambda d: d.x)
        if not NUMBER_DIGITS[0] <= len(glyphs) <= NUMBER_DIGITS[1] or glyphs[0].value == "0":
            raise ValueError("number: needs 4-5 glyphs, the first not 0")
        return "".join(d.value for d in glyphs)
    raise ValueError(f"unknown question type {qtype!r}")


# ---------------------------------------------------------------------- drawing
def render(scene: Scene) -> Image.Image:
    """Scene -> RGB image (width x height)."""
    img = Image.new("RGB", (scene.width, scene.height), scene.background)
    _draw(ImageDraw.Draw(img), scene, lambda s: s.rgb, lambda d: d.rgb)
    return img


# Per-pixel label ids of :func:`label_image` (0 = background).
SHAPE_LABELS = ("background", *SHAPES, *(f"digit {d}" for d in DIGIT_GLYPHS))
COLOUR_LABELS = ("none", *COLOURS)


def label_image(scene: Scene, what: str) -> Image.Image:
    """Scene -> "L" image of label ids, drawn with the same primitives as :func:`render`:
    ``what="shape"``: index in SHAPE_LABELS (a digit, or a glyph of a number, labels its whole box);
    ``what="colour"``: index in COLOUR_LABELS (digits are "none")."""
    img = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(img)
    if what == "shape":
        _draw(draw, scene, lambda s: SHAPE_LABELS.index(s.shape), lambda d: SHAPE_LABELS.index(f"digit {d.value}"),
              digit_box=True)
    elif what == "colour":
        _draw(draw, scene, lambda s: COLOUR_LABELS.index(s.colour), None)
    else:
        raise ValueError(f"label kind must be 'shape' or 'colour', not {what!r}")
    return img


def _draw(draw: ImageDraw.ImageDraw, scene: Scene, shape_fill, digit_fill, digit_box: bool = False) -> None:
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box
        fill = shape_fill(s)
        if s.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif s.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # triangle, pointing up
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    if digit_fill is None:
        return
    for d in ((scene.digit,) if scene.digit is not None else ()) + scene.number:
        fill = digit_fill(d)
        if digit_box:
            x0, y0, x1, y1 = d.box
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
            continue
        for r, row in enumerate(DIGIT_GLYPHS[d.value]):
            for c, ch in enumerate(row):
                if ch == "#":
                    x, y = d.x + c * d.scale, d.y + r * d.scale
                    draw.rectangle((x, y, x + d.scale - 1, y + d.scale - 1), fill=fill)


def image_digest(img: Image.Image) -> str:
    return hashlib.sha1(np.asarray(img).tobytes()).hexdigest()


# ---------------------------------------------------------------------- generation
class _Retry(Exception):
    """The random layout did not fit; draw again."""


def _overlaps(a: Sequence[int], b: Sequence[int], pad: int) -> bool:
    return not (a[2] + pad <= b[0] or b[2] + pad <= a[0] or a[3] + pad <= b[1] or b[3] + pad <= a[1])


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)  # type: ignore[return-value]


class _Layout:
    """Places non-overlapping boxes at random."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.boxes: list[tuple[int, int, int, int]] = []

    def place(self, w: int, h: int, tries: int = 60) -> tuple[int, int]:
        """Top-left corner of a free w x h box."""
        for _ in range(tries):
            x = int(self.rng.integers(MARGIN, WIDTH - MARGIN - w + 1))
            y = int(self.rng.integers(MARGIN, HEIGHT - MARGIN - h + 1))
            box = (x, y, x + w, y + h)
            if not any(_overlaps(box, b, SPACING) for b in self.boxes):
                self.boxes.append(box)
                return x, y
        raise _Retry

    def shape(self, shape: str, colour: str) -> Shape:
        size = int(self.rng.integers(MIN_SIZE, MAX_SIZE + 1))
        x, y = self.place(size, size)
        return Shape(shape, colour, x + size // 2, y + size // 2, size, _jitter(self.rng, COLOURS[colour], 12))

    def digit(self, value: str) -> Digit:
        scale = int(self.rng.choice(DIGIT_SCALES))
        x, y = self.place(5 * scale, 7 * scale)
        grey = int(self.rng.integers(0, 70))
        return Digit(value, x, y, scale, (grey, grey, grey))

    def number(self, value: str) -> tuple[Digit, ...]:
        """A row of separate glyphs, one box for the row."""
        scale = int(self.rng.choice(NUMBER_SCALES))
        gap = int(self.rng.integers(10, 17))  # px between glyphs: at 4-8 px a tower from scratch ran them together
        w = len(value) * 5 * scale + (len(value) - 1) * gap
        x, y = self.place(w, 7 * scale)
        grey = int(self.rng.integers(0, 70))
        return tuple(Digit(v, x + i * (5 * scale + gap), y, scale, (grey, grey, grey)) for i, v in enumerate(value))


def _pick(rng: np.random.Generator, seq: Sequence[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _scene(rng: np.random.Generator, qtype: str, easy: bool = False) -> tuple[Scene, str | None, str]:
    """One scene for a question type; returns (scene, question arg, intended answer).
    ``easy``: the fewest objects the question allows (no distractors, no stray digit)."""
    bg_level = int(rng.integers(215, 251))
    background = _jitter(rng, (bg_level,) * 3, 6)  # type: ignore[arg-type]
    lay = _Layout(rng)
    colours, shapes = list(COLOURS), list(SHAPES)
    arg: str | None = None
    objs: list[Shape] = []
    with_digit = rng.random() < 0.5 and not easy and qtype != "number"
    if qtype == "colour":
        arg, answer = _pick(rng, shapes), _pick(rng, colours)
        others = [s for s in shapes if s != arg]
        objs.append(lay.shape(arg, answer))
        for _ in range(int(rng.integers(0, 5)) if not easy else 0):
            objs.append(lay.shape(_pick(rng, others), _pick(rng, colours)))
    elif qtype == "count":
        arg = _pick(rng, shapes)
        n = int(rng.integers(1, MAX_COUNT + 1))
        answer = str(n)
        others = [s for s in shapes if s != arg]
        for _ in range(n):
            objs.append(lay.shape(arg, _pick(rng, colours)))
        for _ in range(int(rng.integers(0, min(3, MAX_OBJECTS - n) + 1)) if not easy else 0):
            objs.append(lay.shape(_pick(rng, others), _pick(rng, colours)))
    elif qtype in ("top", "left"):
        answer = _pick(rng, shapes if qtype == "top" else colours)
        n = int(rng.integers(2, 6)) if not easy else 2
        for i in range(n):
            if qtype == "top":
                objs.append(lay.shape(answer if i == 0 else _pick(rng, shapes), _pick(rng, colours)))
            else:
                objs.append(lay.shape(_pick(rng, shapes), answer if i == 0 else _pick(rng, colours)))
        key = (lambda s: s.cy) if qtype == "top" else (lambda s: s.cx)
        first, rest = objs[0], objs[1:]
        if any(key(s) - key(first) < GAP for s in rest):
            raise _Retry
    elif qtype == "digit":
        answer = _pick(rng, [str(i) for i in range(10)])
        with_digit = True
        for _ in range(int(rng.integers(1, 5)) if not easy else 0):
            objs.append(lay.shape(_pick(rng, shapes), _pick(rng, colours)))
    elif qtype == "list":
        lo, hi = LIST_SHAPES
        for _ in range(int(rng.integers(lo, hi + 1)) if not easy else lo):
            objs.append(lay.shape(_pick(rng, shapes), _pick(rng, colours)))
        xs = sorted(o.cx for o in objs)
        if any(b - a < GAP for a, b in zip(xs, xs[1:])):
            raise _Retry
        answer = list_answer(objs)
    elif qtype == "describe":
        lo, hi = DESCRIBE_SHAPES
        for _ in range(int(rng.integers(lo, hi + 1)) if not easy else lo):
            objs.append(lay.shape(_pick(rng, shapes), _pick(rng, colours)))
        with_digit = True
        answer = ""  # set once the digit is drawn
    elif qtype == "number":
        lo, hi = NUMBER_DIGITS
        n = int(rng.integers(lo, hi + 1)) if not easy else lo
        answer = _pick(rng, [str(i) for i in range(1, 10)]) + "".join(_pick(rng, [str(i) for i in range(10)])
                                                                      for _ in range(n - 1))
        number = lay.number(answer)
        for _ in range(int(rng.integers(0, 3)) if not easy else 0):
            objs.append(lay.shape(_pick(rng, shapes), _pick(rng, colours)))
        order = rng.permutation(len(objs))
        return Scene(background, tuple(objs[i] for i in order), None, number), None, answer
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    digit = None
    if with_digit:
        digit = lay.digit(answer if qtype == "digit" else _pick(rng, [str(i) for i in range(10)]))
    if qtype == "describe":
        answer = describe_answer(objs, digit.value)
    order = rng.permutation(len(objs))  # drawing order carries no hint
    return Scene(background, tuple(objs[i] for i in order), digit), arg, answer


def sample(split: str, index: int, *, easy: bool = False, qtype: str | None = None) -> Sample:
    """Sample ``index`` of ``split`` (deterministic). ``easy`` (training curriculum only): the
    same question type with the fewest objects that question allows, a scene of its own.
    ``qtype``: this question type instead of the drawn one (a scene of its own; training mixes)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLIT_SEEDS)})")
    if qtype is not None and qtype not in QTYPES:
        raise ValueError(f"unknown question type {qtype!r} (choose from {', '.join(QTYPES)})")
    key = (SPLIT_SEEDS[split], index) + ((1,) if easy else ()) + ((2, QTYPES.index(qtype)) if qtype else ())
    rng = np.random.default_rng(key)
    drawn = QTYPES[int(rng.integers(len(QTYPES)))]
    qtype = qtype or drawn
    while True:
        try:
            scene, arg, answer = _scene(rng, qtype, easy)
            break
        except _Retry:
            continue
    assert derive_answer(scene, qtype, arg) == answer
    return Sample(split, index, qtype, arg, question_text(qtype, arg), answer, scene)


def make_split(name: str, n: int, start: int = 0) -> list[Sample]:
    """Samples ``start .. start + n - 1`` of split ``name`` (deterministic)."""
    return [sample(name, i) for i in range(start, start + n)]


def balanced_split(name: str, per_type: int, types: Sequence[str] = QTYPES) -> list[Sample]:
    """The first ``per_type`` samples of every question type in ``types`` (in split order, scanning
    ``name`` from index 0): the evaluation sets of the sweeps."""
    want = {t: per_type for t in types}
    out, i = [], 0
    while any(want.values()):
        s = sample(name, i)
        if want.get(s.qtype, 0):
            out.append(s)
            want[s.qtype] -= 1
        i += 1
    return out


# ---------------------------------------------------------------------- baselines
def text_only_baseline(split: str | Sequence[Sample], n: int = 2000) -> dict:
    """Accuracy of the best question-only guess on ``split`` (its first ``n`` samples).

    For every distinct question the guess is its most frequent answer *in the evaluated
    samples themselves*: an upper bound for any predictor that ignores the image.
    Returns ``{"overall": acc, "per_type": {qtype: acc}, "n": n}``."""
    samples = make_split(split, n) if isinstance(split, str) else list(split)
    by_q: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        by_q[s.question][s.answer] += 1
    guess = {q: c.most_common(1)[0][0] for q, c in by_q.items()}
    hits: dict[str, list[bool]] = defaultdict(list)
    for s in samples:
        hits[s.qtype].append(guess[s.question] == s.answer)
    total = sum(sum(h) for h in hits.values())
    return {
        "overall": total / max(1, len(samples)),
        "per_type": {t: sum(h) / len(h) for t, h in sorted(hits.items())},
        "n": len(samples),
    }


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    import math

    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def answer_words(text: str) -> list[str]:
    """The words of an answer for token-level F1: letters runs and single digits (a number is
    read digit by digit), lower case; punctuation is dropped."""
    return re.findall(r"[a-z]+|\d", text.lower())


def answer_f1(predicted: str, truth: str) -> float:
    """Token-level F1 of two answers (SQuAD-style, over :func:`answer_words` as multisets)."""
    p, t = answer_words(predicted), answer_words(truth)
    common = sum((Counter(p) & Counter(t)).values())
    if not p or not t or not common:
        return float(p == t)
    precision, recall = common / len(p), common / len(t)
    return 2 * precision * recall / (precision + recall)


def answer_length(qtype: str) -> str:
    return "long" if qtype in LONG_TYPES else "short"


def accuracy_table(types: Sequence[str], hits: Sequence[bool], f1: Sequence[float] | None = None) -> dict:
    """Accuracy (exact match) overall (with its 95% interval), per question type and per answer
    length (short / long types); with ``f1`` (one score per answer) the mean F1 the same ways."""
    per: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(types):
        per[t].append(i)
        per[answer_length(t)].append(i)
    k, n = sum(hits), len(hits)
    lo, hi = wilson(k, n)
    kinds = [t for t in sorted(per) if t not in ("short", "long")]
    out = {"overall": k / max(1, n), "correct": k, "n": n, "ci95": [lo, hi],
           "per_type": {t: sum(hits[i] for i in per[t]) / len(per[t]) for t in kinds},
           "per_type_n": {t: len(per[t]) for t in kinds},
           "per_length": {t: sum(hits[i] for i in per[t]) / len(per[t]) for t in ("short", "long") if per[t]}}
    if f1 is not None:
        out["f1"] = sum(f1) / max(1, n)
        out["per_type_f1"] = {t: sum(f1[i] for i in per[t]) / len(per[t]) for t in kinds}
        out["per_length_f1"] = {t: sum(f1[i] for i in per[t]) / len(per[t]) for t in ("short", "long") if per[t]}
    return out


def score(samples: Sequence[Sample], predictions: Sequence[str]) -> dict:
    """:func:`accuracy_table` of predictions (exact match after stripping, and F1) on samples."""
    return accuracy_table([s.qtype for s in samples], [p.strip() == s.answer for p, s in zip(predictions, samples)],
                          [answer_f1(p, s.answer) for p, s in zip(predictions, samples)])


GEN_LENGTH = 32  # the demo model's evaluation response length: the answer + <|eot_id|> padding (long types: up to 22 tokens)
DEMO_BPE_VOCAB = 448  # 256 byte symbols + 192 merges: every answer and task word is one token


def demo_tokenizer():
    """The demo model's own tokenizer: the stand-in byte-level BPE with the official special
    tokens and chat template, trained on the built-in text plus the task's questions and
    answers, so that every answer is a single token (462 entries)."""
    from .synthetic.tokenizer import build_tokenizer
    from .tokenizer import DEFAULT_SYSTEM_PROMPT

    roles = ["system", "user", "assistant"]
    return build_tokenizer("tiny", corpus=tokenizer_corpus() + (roles + [DEFAULT_SYSTEM_PROMPT]) * 20,
                           bpe_vocab_size=DEMO_BPE_VOCAB)


def prompt_tokens(tokenizer, system: str | None = None) -> int:
    """Text tokens (chat template included) of the longest question the task can ask: the prompt
    size of a bucket that takes every question of the task."""
    from .tokenizer import DEFAULT_SYSTEM_PROMPT, encode_prompt

    system = DEFAULT_SYSTEM_PROMPT if system is None else system
    return max(sum(len(p) for p in encode_prompt(tokenizer, q, has_image=True, system=system))
               for q in all_questions())


def patch_labels(scene: Scene, cfg, min_cover: float = 0.25) -> np.ndarray:
    """Per-patch labels of every anyres crop, for the demo model's auxiliary vision objective:
    [2, N, T] uint8 = (shape label, colour label) of each of the T patches of the N crops
    (:data:`SHAPE_LABELS` / :data:`COLOUR_LABELS`). The label maps go through the crops'
    geometry with nearest resampling; a patch takes the most frequent non-background label
    covering at least ``min_cover`` of it, else background. ``cfg``: an LLaDAVConfig."""
    from .graphs.anyres import resize_and_pad, select_best_resolution, split_tiles

    s, ps = cfg.vision.image_size, cfg.vision.patch_size
    p = s // ps
    best = select_best_resolution((scene.width, scene.height), cfg.image_grid_pinpoints)
    out = []
    for what, n_labels in (("shape", len(SHAPE_LABELS)), ("colour", len(COLOUR_LABELS))):
        lab = label_image(scene, what)
        crops = [lab.resize((s, s), Image.Resampling.NEAREST)] + split_tiles(
            resize_and_pad(lab, best, Image.Resampling.NEAREST), s)
        ids = np.stack([np.asarray(c) for c in crops])  # [N, S, S] uint8
        n = len(crops)
        counts = np.bincount((_patch_index(n, s, ps) * n_labels + ids).ravel(), minlength=n * p * p * n_labels)
        counts = counts.reshape(n, p * p, n_labels)  # [N, T, labels]: pixels of each label per patch
        counts[..., 0] = 0
        best_label = counts.argmax(-1)  # [N, T]
        out.append(np.where(counts.max(-1) >= min_cover * ps * ps, best_label, 0).astype(np.uint8))
    return np.stack(out)  # [2, N, T]


@functools.lru_cache(maxsize=4)
def _patch_index(n: int, s: int, ps: int) -> np.ndarray:
    """[N, S, S] int32: the index (crop * T + patch) of every pixel's patch."""
    p = s // ps
    return ((np.arange(n)[:, None, None] * p + np.arange(s)[None, :, None] // ps) * p
            + np.arange(s) // ps).astype(np.int32)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    for s in make_split("val", 10):
        print(f"val[{s.index}] {s.qtype:6s} {s.question!r:42s} -> {s.answer!r}  ({len(s.scene.shapes)} shapes, "
              f"digit {s.scene.digit.value if s.scene.digit else None})")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            s.image().save(out / f"val_{s.index:03d}.png")
    for split in ("val", "test"):
        print(split, "text-only baseline:", text_only_baseline(split))
