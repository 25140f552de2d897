"""A programmatic detector for the shapes domain: colour segmentation + shape classification.

Pixels take the nearest named colour (or background); connected regions above a minimum area
are object cores. Each core then takes in the soft edge pixels around it that are more its colour
than the background (alpha > 1/2 along the background -> colour line): at 64x64 a star's points
are a few blended pixels wide, and without them a slightly soft star reads as a circle. A
nearest-prototype classifier on three geometric features (fill of the bounding box, solidity,
vertical centroid offset) names the shape. Prototypes are measured on the generator's own renders,
and the detector is checked on renders (sharp and blurred) before it judges a model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from training.shapes import BACKGROUNDS, COLOURS, SHAPES, Obj, Scene, render

PALETTE_NAMES = list(COLOURS) + [f"bg:{b}" for b in BACKGROUNDS]
PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
BACKGROUND_COLOURS = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
MIN_AREA = 0.006  # of the image: smaller regions are edge noise


@dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    cx: float  # centroid in [0, 1]
    cy: float
    area: float  # fraction of the image


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    regions = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        queue, pixels = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        regions.append(np.array(pixels))
    return regions


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of pixel squares (monotone chain on pixel corners)."""
    corners = np.concatenate([points + d for d in ((0, 0), (0, 1), (1, 0), (1, 1))])
    pts = sorted(set(map(tuple, corners.tolist())))
    if len(pts) < 3:
        return float(len(points))

    def half(seq):
        out: list[tuple[int, int]] = []
        for p in seq:
            while (
                len(out) >= 2
                and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0]))
                <= 0
            ):
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    ys, xs = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))


def features(region: np.ndarray) -> np.ndarray:
    ys, xs = region[:, 0], region[:, 1]
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(region) / (h * w)
    solidity = len(region) / max(_hull_area(region), 1.0)
    offset = (ys.mean() + 0.5 - (ys.min() + h / 2)) / h  # > 0: mass sits low (triangle)
    return np.array([fill, solidity, 4 * offset], dtype=np.float32)


@lru_cache(maxsize=4)
def prototypes(size: int) -> dict[str, np.ndarray]:
    """Mean features of each shape, measured on renders at this resolution."""
    out = {}
    for shape in SHAPES:
        feats = []
        for i, scale in enumerate((0.18, 0.22, 0.26, 0.3)):
            scene = Scene("", "single", "", "black", (Obj(shape, "white", 0.5 + 0.01 * i, 0.5, scale),))
            mask = np.abs(render(scene, size).astype(np.float32) - COLOURS["white"]).sum(-1) < 60
            feats.append(features(max(_components(mask), key=len)))
        out[shape] = np.mean(feats, axis=0)
    return out


def _background(image: np.ndarray) -> np.ndarray:
    """The background colour nearest to the median of the image's border."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    return BACKGROUND_COLOURS[np.argmin(((np.median(border, 0) - BACKGROUND_COLOURS) ** 2).sum(-1))]


def _grow(
    core: np.ndarray, image: np.ndarray, colour: np.ndarray, background: np.ndarray, blocked: np.ndarray
) -> np.ndarray:
    """The core plus the 4-connected pixels around it that blend `colour` over `background` with
    alpha > 1/2 and lie near that blend line (not another object's colour)."""
    axis = colour - background
    offset = image - background
    alpha = (offset @ axis) / float(axis @ axis)
    off_line = np.linalg.norm(offset - alpha[..., None] * axis, axis=-1)
    allowed = (alpha > 0.5) & (off_line < 0.5 * np.linalg.norm(axis)) & ~blocked
    mask = np.zeros(blocked.shape, bool)
    mask[core[:, 0], core[:, 1]] = True
    queue = deque(map(tuple, core))
    h, w = blocked.shape  # = mask.shape, which numpy's stub types as ()
    while queue:
        y, x = queue.popleft()
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < h and 0 <= nx < w and allowed[ny, nx] and not mask[ny, nx]:
                mask[ny, nx] = True
                queue.append((ny, nx))
    return np.argwhere(mask)


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image, largest first."""
    h, w, _ = image.shape
    pixels = image.astype(np.float32)
    nearest = ((pixels[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1).argmin(-1)
    cores = [
        (index, region)
        for index, name in enumerate(PALETTE_NAMES)
        if not name.startswith("bg:")
        for region in _components(nearest == index)
        if len(region) / (h * w) >= MIN_AREA
    ]
    taken = np.zeros((h, w), bool)
    for _, region in cores:
        taken[region[:, 0], region[:, 1]] = True
    background, protos = _background(image), prototypes(h)
    found = []
    for index, core in cores:
        others = taken.copy()
        others[core[:, 0], core[:, 1]] = False
        region = _grow(core, pixels, PALETTE[index], background, others)
        f = features(region)
        shape = min(protos, key=lambda s: float(((protos[s] - f) ** 2).sum()))
        found.append(
            Detection(
                PALETTE_NAMES[index],
                shape,
                (region[:, 1].mean() + 0.5) / w,
                (region[:, 0].mean() + 0.5) / h,
                len(region) / (h * w),
            )
        )
    return sorted(found, key=lambda d: -d.area)


def _has(found: list[Detection], colour: str, shape: str) -> Detection | None:
    return next((d for d in found if d.colour == colour and d.shape == shape), None)


def _holds(a: Detection, b: Detection, relation: str) -> bool:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    return {
        "left of": dx < -abs(dy) * 0.5,
        "right of": dx > abs(dy) * 0.5,
        "above": dy < -abs(dx) * 0.5,
        "below": dy > abs(dx) * 0.5,
    }[relation]


def score(scene: Scene, image: np.ndarray) -> dict[str, bool]:
    """Judge an image against the scene its caption describes. Keys depend on the category;
    `correct` is the category's verdict."""
    found = detect(image)
    objs = scene.objects
    if scene.category in ("single", "colour"):
        main = found[0] if found else None
        colour = main is not None and main.colour == objs[0].colour
        shape = main is not None and main.shape == objs[0].shape
        verdict = colour if scene.category == "colour" else colour and shape
        return {"colour": colour, "shape": shape, "correct": verdict}
    if scene.category == "counting":
        same = [d for d in found if d.colour == objs[0].colour]
        shapes_ok = sum(d.shape == objs[0].shape for d in same) >= len(same) / 2 if same else False
        return {"count": len(same) == len(objs), "correct": len(same) == len(objs) and shapes_ok}
    a, b = _has(found, objs[0].colour, objs[0].shape), _has(found, objs[1].colour, objs[1].shape)
    if scene.category == "position":
        relation = next(r for r in ("left of", "right of", "above", "below") if f" {r} " in f" {scene.caption} ")
        return {"both": bool(a and b), "correct": bool(a and b and _holds(a, b, relation))}
    return {"both": bool(a and b), "correct": bool(a and b)}
