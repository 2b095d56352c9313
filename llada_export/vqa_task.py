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
==========  ====================================  =======================

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
QTYPES = ("colour", "count", "top", "left", "digit")
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
    raise ValueError(f"unknown question type {qtype!r}")


def all_questions() -> list[str]:
    """Every question the task can ask."""
    qs = [question_text("colour", s) for s in SHAPES] + [question_text("count", s) for s in SHAPES]
    return qs + [question_text(t) for t in ("top", "left", "digit")]


def all_answers() -> list[str]:
    return sorted(set(COLOURS) | set(SHAPES) | {str(i) for i in range(10)})


def tokenizer_corpus(repeat: int = 20) -> list[str]:
    """Training lines for the demo model's own BPE: every question, and every answer alone on
    a line (as a response starts, without a leading space), repeated so that whole words
    become single tokens."""
    return (all_questions() + all_answers()) * repeat


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
    raise ValueError(f"unknown question type {qtype!r}")


# ---------------------------------------------------------------------- drawing
def render(scene: Scene) -> Image.Image:
    """Scene -> RGB image (width x height)."""
    img = Image.new("RGB", (scene.width, scene.height), scene.background)
    _draw(ImageDraw.Draw(img), scene, lambda s: s.rgb, scene.digit.rgb if scene.digit else None)
    return img


# Per-pixel label ids of :func:`label_image` (0 = background).
SHAPE_LABELS = ("background", *SHAPES, *(f"digit {d}" for d in DIGIT_GLYPHS))
COLOUR_LABELS = ("none", *COLOURS)


def label_image(scene: Scene, what: str) -> Image.Image:
    """Scene -> "L" image of label ids, drawn with the same primitives as :func:`render`:
    ``what="shape"``: index in SHAPE_LABELS (a digit labels its whole glyph box);
    ``what="colour"``: index in COLOUR_LABELS (digits are "none")."""
    img = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(img)
    if what == "shape":
        _draw(draw, scene, lambda s: SHAPE_LABELS.index(s.shape),
              SHAPE_LABELS.index(f"digit {scene.digit.value}") if scene.digit else None, digit_box=True)
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
    if scene.digit is not None and digit_fill is not None:
        d = scene.digit
        if digit_box:
            x0, y0, x1, y1 = d.box
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=digit_fill)
            return
        for r, row in enumerate(DIGIT_GLYPHS[d.value]):
            for c, ch in enumerate(row):
                if ch == "#":
                    x, y = d.x + c * d.scale, d.y + r * d.scale
                    draw.rectangle((x, y, x + d.scale - 1, y + d.scale - 1), fill=digit_fill)


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
    with_digit = rng.random() < 0.5 and not easy
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
    else:
        raise ValueError(f"unknown question type {qtype!r}")
    digit = None
    if with_digit:
        digit = lay.digit(answer if qtype == "digit" else _pick(rng, [str(i) for i in range(10)]))
    order = rng.permutation(len(objs))  # drawing order carries no hint
    return Scene(background, tuple(objs[i] for i in order), digit), arg, answer


def sample(split: str, index: int, easy: bool = False) -> Sample:
    """Sample ``index`` of ``split`` (deterministic). ``easy`` (training curriculum only): the
    same question type with the fewest objects that question allows, a scene of its own."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLIT_SEEDS)})")
    rng = np.random.default_rng((SPLIT_SEEDS[split], index) + ((1,) if easy else ()))
    qtype = QTYPES[int(rng.integers(len(QTYPES)))]
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


def accuracy_table(types: Sequence[str], hits: Sequence[bool]) -> dict:
    """Accuracy overall (with its 95% interval) and per question type."""
    per: dict[str, list[bool]] = defaultdict(list)
    for t, h in zip(types, hits):
        per[t].append(h)
    k, n = sum(hits), len(hits)
    lo, hi = wilson(k, n)
    return {"overall": k / max(1, n), "correct": k, "n": n, "ci95": [lo, hi],
            "per_type": {t: sum(v) / len(v) for t, v in sorted(per.items())},
            "per_type_n": {t: len(v) for t, v in sorted(per.items())}}


GEN_LENGTH = 8  # the demo model's evaluation response length: the answer + <|eot_id|> padding
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
