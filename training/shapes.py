"""A procedural dataset: flat-coloured shapes on plain backgrounds, each with a caption.

Scenes are deterministic by seed. Every caption belongs to one category (single object, two
objects, counting, colours, position, colour attribution) and one template; 20% of the
templates are held out of training to measure generalisation.

Two layouts. "free" places objects anywhere they fit. "composed" places them as a caption reads,
with a little jitter: one object near the centre, named objects left to right, counted objects in a
row or a 2x2 grid, related objects on either side of a point near the centre. Where the caption does
not say where things are, a free layout makes the image's coarse scales a coin toss the text cannot
settle; a small transformer then samples each coarse token's bits from a mixture of layouts and
draws objects twice, merged, or not at all. The autoencoder trains on free layouts (it should
reconstruct anything); the transformer learns to compose.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 40),
    "orange": (250, 140, 20),
    "purple": (135, 50, 200),
    "pink": (250, 125, 200),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
    "brown": (130, 80, 35),
    "gray": (140, 140, 140),
    "lime": (170, 245, 60),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (18, 18, 22), "navy": (20, 26, 60)}
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = {2: "two", 3: "three", 4: "four"}
SIZES = {"small": 0.16, "medium": 0.22, "big": 0.30}  # object diameter / image side
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single", "colour", "two", "counting", "position", "attribution")
Layout = Literal["free", "composed"]
JITTER = 0.06  # composed layouts: each centre moves up to this much along each axis


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # centre, in [0, 1] image coordinates
    cy: float
    size: float  # diameter / image side


@dataclass(frozen=True)
class Scene:
    caption: str
    category: str
    template: str
    background: str
    objects: tuple[Obj, ...]


# Templates per category; the last one of each list is held out of training.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a {c} {s}", "one {c} {s}", "a {z} {c} {s}", "a {c} {s} on a plain background", "the {c} {s}"),
    "colour": ("a {s} that is {c}", "a {c} colored {s}", "a single {c} {s}", "a {s} in {c}", "a {s} colored {c}"),
    "two": (
        "a {c} {s} and a {c2} {s2}",
        "a {c} {s} with a {c2} {s2}",
        "a {c} {s} next to a {c2} {s2}",
        "one {c} {s} and one {c2} {s2}",
        "a {c} {s} beside a {c2} {s2}",
    ),
    "counting": (
        "{n} {c} {s}s",
        "exactly {n} {c} {s}s",
        "{n} {c} {s}s on a plain background",
        "a group of {n} {c} {s}s",
        "there are {n} {c} {s}s",
    ),
    "position": (
        "a {c} {s} {r} a {c2} {s2}",
        "a {c} {s} placed {r} a {c2} {s2}",
        "a {c} {s} is {r} a {c2} {s2}",
        "a {c} {s} located {r} a {c2} {s2}",
        "a {c} {s} sits {r} a {c2} {s2}",
    ),
    "attribution": (
        "a {c} {s} and a {c2} {s2}",
        "a {s} that is {c} and a {s2} that is {c2}",
        "a {c} {s} together with a {c2} {s2}",
        "a {c} {s} plus a {c2} {s2}",
        "a {c} {s} and also a {c2} {s2}",
    ),
}
HELD_OUT = {cat: templates[-1] for cat, templates in TEMPLATES.items()}
# The words that say what is drawn: colours, shapes (and plurals), numbers, sizes, relations.
NAMING_WORDS = frozenset(
    {*COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *NUMBERS.values(), *SIZES, *" ".join(RELATIONS).split()}
)


def vocabulary() -> list[str]:
    """The words of the training templates plus every colour, shape, number, size and relation.
    Words found only in held-out templates ("the", "beside", ...) stay out: to the tokenizer they are
    unknown, as a user's own words are, so the held-out score measures generalisation to new wording
    rather than the fate of an embedding that training never touched."""
    words: set[str] = set()
    for category, templates in TEMPLATES.items():
        for t in templates:
            if t != HELD_OUT[category]:
                words.update(w for w in t.replace("{", " {").split() if not w.startswith("{"))
    return sorted(words | NAMING_WORDS)


def _place(rng: random.Random, sizes: list[float], tries: int = 200) -> list[tuple[float, float]] | None:
    """Non-overlapping centres for objects of the given sizes."""
    centres: list[tuple[float, float]] = []
    for size in sizes:
        for _ in range(tries):
            r = size / 2 + 0.03
            c = (rng.uniform(r, 1 - r), rng.uniform(r, 1 - r))
            if all(math.dist(c, o) > (size + s2) / 2 + 0.04 for o, s2 in zip(centres, sizes, strict=False)):
                centres.append(c)
                break
        else:
            return None
    return centres


def _composed(rng: random.Random, sizes: list[float]) -> list[tuple[float, float]]:
    """Centres as the caption reads: one near the middle, two or three in a row (first named on the
    left), four in a 2x2 grid; each jittered by up to JITTER."""
    slots = {
        1: [(0.5, 0.5)],
        2: [(0.27, 0.5), (0.73, 0.5)],
        3: [(0.18, 0.5), (0.5, 0.5), (0.82, 0.5)],
        4: [(0.3, 0.3), (0.7, 0.3), (0.3, 0.7), (0.7, 0.7)],
    }[len(sizes)]
    jitter = JITTER if len(sizes) != 3 else JITTER / 3  # three in a row leave a narrow gap
    return [(x + rng.uniform(-jitter, jitter), y + rng.uniform(-jitter, jitter)) for x, y in slots]


def _relation_centres(
    rng: random.Random, relation: str, size: float, size2: float, layout: Layout
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of A and B such that A is `relation` B, with a clear margin; "composed" keeps the
    pair's midpoint near the image centre."""
    spread = 0.1 if layout == "free" else JITTER
    along, across = rng.uniform(0.22, 0.32), rng.uniform(-0.08, 0.08)
    mid = (rng.uniform(0.5 - spread, 0.5 + spread), rng.uniform(0.5 - spread, 0.5 + spread))
    a = {
        "left of": (mid[0] - along, mid[1] + across),
        "right of": (mid[0] + along, mid[1] + across),
        "above": (mid[0] + across, mid[1] - along),
        "below": (mid[0] + across, mid[1] + along),
    }[relation]
    b = (2 * mid[0] - a[0], 2 * mid[1] - a[1])

    def clamp(p: tuple[float, float], s: float) -> tuple[float, float]:
        lo, hi = s / 2 + 0.02, 1 - s / 2 - 0.02
        return min(max(p[0], lo), hi), min(max(p[1], lo), hi)

    return clamp(a, size), clamp(b, size2)


def make_scene(
    seed: int, category: str | None = None, held_out: bool | None = False, layout: Layout = "composed"
) -> Scene:
    """A random scene. held_out: False = training templates only, True = held-out only, None = any.
    layout: "composed" (the transformer's training scenes and the eval's ceiling) or "free" (the VAE's)."""
    rng = random.Random(seed)
    category = category or rng.choice(CATEGORIES)
    templates = [t for t in TEMPLATES[category] if held_out is None or (t == HELD_OUT[category]) == bool(held_out)]
    template = rng.choice(templates)
    while True:
        scene = _try_scene(rng, category, template, layout)
        if scene is not None:
            return scene


def _try_scene(rng: random.Random, category: str, template: str, layout: Layout) -> Scene | None:
    colours, shapes = list(COLOURS), list(SHAPES)
    c, s = rng.choice(colours), rng.choice(shapes)
    c2 = rng.choice([x for x in colours if x != c])
    s2 = rng.choice(shapes)
    z = rng.choice(list(SIZES))
    background = rng.choice(list(BACKGROUNDS))
    size = SIZES[z] if "{z}" in template else rng.uniform(0.2, 0.32)
    fields = {"c": c, "s": s, "c2": c2, "s2": s2, "z": z}
    place = _place if layout == "free" else _composed
    if category in ("single", "colour"):
        centres = place(rng, [size])
        objects = [Obj(s, c, *centres[0], size)] if centres else None
    elif category in ("two", "attribution"):
        sizes = [rng.uniform(0.2, 0.3), rng.uniform(0.2, 0.3)]
        centres = place(rng, sizes)
        objects = [Obj(s, c, *centres[0], sizes[0]), Obj(s2, c2, *centres[1], sizes[1])] if centres else None
    elif category == "counting":
        n = rng.choice(list(NUMBERS))
        fields["n"] = NUMBERS[n]
        sizes = [rng.uniform(0.16, 0.22)] * n
        centres = place(rng, sizes)
        objects = [Obj(s, c, x, y, sizes[0]) for x, y in centres] if centres else None
    else:
        relation = rng.choice(RELATIONS)
        fields["r"] = relation
        sa, sb = rng.uniform(0.2, 0.28), rng.uniform(0.2, 0.28)
        a, b = _relation_centres(rng, relation, sa, sb, layout)
        objects = [Obj(s, c, *a, sa), Obj(s2, c2, *b, sb)] if math.dist(a, b) > (sa + sb) / 2 + 0.04 else None
    if objects is None:
        return None
    return Scene(template.format(**fields), category, template, background, tuple(objects))


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        k = r * 0.86
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    points = []
    for i in range(10):  # star: 5 points
        rr = r if i % 2 == 0 else r * 0.42
        a = -math.pi / 2 + i * math.pi / 5
        points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return points


def render(scene: Scene, size: int, supersample: int = 4) -> np.ndarray:
    """(size, size, 3) uint8 RGB, anti-aliased by supersampling."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.cx * big, o.cy * big, o.size * big / 2
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[o.colour])
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=COLOURS[o.colour])
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS))
