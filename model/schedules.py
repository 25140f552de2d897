"""Official scale schedules: 15 aspect-ratio templates x 4 pixel budgets (pn).

Every schedule is a prefix of its template's 1M list (13 scales ending at 1024x1024-class
sizes). Image size = last (h, w) scale x 16 pixels (the 2B stride-16 VAE; the 8B stride-8 VAE
decodes a 2x larger latent to the same pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, get_args

# (h, w) per scale of the 1M schedule for the templates with h >= w; the inverse templates
# (0.8, 0.75, ...) use the same lists with h and w swapped.
_TALL_1M: dict[float, tuple[tuple[int, int], ...]] = {
    1.0: (
        (1, 1),
        (2, 2),
        (4, 4),
        (6, 6),
        (8, 8),
        (12, 12),
        (16, 16),
        (20, 20),
        (24, 24),
        (32, 32),
        (40, 40),
        (48, 48),
        (64, 64),
    ),
    1.25: (
        (1, 1),
        (2, 2),
        (3, 3),
        (5, 4),
        (10, 8),
        (15, 12),
        (20, 16),
        (25, 20),
        (30, 24),
        (35, 28),
        (45, 36),
        (55, 44),
        (70, 56),
    ),
    1.333: (
        (1, 1),
        (2, 2),
        (4, 3),
        (8, 6),
        (12, 9),
        (16, 12),
        (20, 15),
        (24, 18),
        (28, 21),
        (36, 27),
        (48, 36),
        (60, 45),
        (72, 54),
    ),
    1.5: (
        (1, 1),
        (2, 2),
        (3, 2),
        (6, 4),
        (9, 6),
        (15, 10),
        (21, 14),
        (27, 18),
        (33, 22),
        (39, 26),
        (48, 32),
        (63, 42),
        (78, 52),
    ),
    1.75: (
        (1, 1),
        (2, 2),
        (3, 3),
        (7, 4),
        (11, 6),
        (14, 8),
        (21, 12),
        (28, 16),
        (35, 20),
        (42, 24),
        (56, 32),
        (70, 40),
        (84, 48),
    ),
    2.0: (
        (1, 1),
        (2, 2),
        (4, 2),
        (6, 3),
        (10, 5),
        (16, 8),
        (22, 11),
        (30, 15),
        (38, 19),
        (46, 23),
        (60, 30),
        (74, 37),
        (90, 45),
    ),
    2.5: (
        (1, 1),
        (2, 2),
        (5, 2),
        (10, 4),
        (15, 6),
        (20, 8),
        (25, 10),
        (30, 12),
        (40, 16),
        (50, 20),
        (65, 26),
        (80, 32),
        (100, 40),
    ),
    3.0: (
        (1, 1),
        (2, 2),
        (6, 2),
        (9, 3),
        (15, 5),
        (21, 7),
        (27, 9),
        (36, 12),
        (45, 15),
        (54, 18),
        (72, 24),
        (90, 30),
        (111, 37),
    ),
}
# Inverse template keys are int(1000 / r) / 1000, exactly as the official table writes them.
_INVERSE = {1.25: 0.8, 1.333: 0.75, 1.5: 0.666, 1.75: 0.571, 2.0: 0.5, 2.5: 0.4, 3.0: 0.333}

SCALES_1M: dict[float, tuple[tuple[int, int], ...]] = {}
for _r, _scales in _TALL_1M.items():
    SCALES_1M[_r] = _scales
    if _r in _INVERSE:
        SCALES_1M[_INVERSE[_r]] = tuple((w, h) for h, w in _scales)

# Order of the official table (used when listing templates to users).
TEMPLATES: tuple[float, ...] = (1.0, 1.25, 0.8, 1.333, 0.75, 1.5, 0.666, 1.75, 0.571, 2.0, 0.5, 2.5, 0.4, 3.0, 0.333)
# The one list of pixel budgets, smallest first: the protocol, the settings, the service and the CLI
# all derive theirs from it (pydantic fields typed PixelBudget validate against it).
PixelBudget = Literal["0.06M", "0.25M", "0.60M", "1M"]
PN_NAMES: tuple[str, ...] = get_args(PixelBudget)  # an index compares two budgets
PN_SCALES: dict[str, int] = dict(zip(PN_NAMES, (7, 10, 12, 13), strict=True))  # budget -> scales of its schedule
LARGEST_PN = PN_NAMES[-1]  # a template's whole schedule; the official runs' default
PIXELS_PER_TOKEN = 16


@dataclass(frozen=True)
class ScaleSchedule:
    """One official schedule: a template (h/w ratio) and a pixel budget."""

    h_div_w: float
    pn: str
    scales: tuple[tuple[int, int], ...]  # transformer token grid (h, w) per scale

    @classmethod
    def official(cls, h_div_w: float, pn: str) -> ScaleSchedule:
        if h_div_w not in SCALES_1M:
            raise ValueError(f"h_div_w template {h_div_w} is not official; valid: {list(TEMPLATES)}")
        if pn not in PN_SCALES:
            raise ValueError(f"pn {pn!r} is not official; valid: {list(PN_SCALES)}")
        return cls(h_div_w, pn, SCALES_1M[h_div_w][: PN_SCALES[pn]])

    @classmethod
    def custom(cls, scales: tuple[tuple[int, int], ...], h_div_w: float = 1.0) -> ScaleSchedule:
        """A non-official schedule (small models); RoPE positions use its own last scale."""
        return cls(h_div_w, "custom", tuple(scales))

    @property
    def key(self) -> str:
        """Stable identifier used by the batcher to group requests."""
        if self.pn == "custom":
            return "custom:" + ",".join(f"{h}x{w}" for h, w in self.scales)
        return f"{self.h_div_w}:{self.pn}"

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @cached_property
    def lengths(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.scales)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each scale in the flat token sequence."""
        out, total = [], 0
        for n in self.lengths:
            out.append(total)
            total += n
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def final(self) -> tuple[int, int]:
        return self.scales[-1]

    @property
    def rope_reference(self) -> tuple[int, int]:
        """Grid that RoPE positions are normalised to: the template's 1M final size."""
        if self.pn == "custom":
            return self.final
        return SCALES_1M[self.h_div_w][-1]

    def image_size(self, pixels_per_token: int = PIXELS_PER_TOKEN) -> tuple[int, int]:
        """(height, width) in pixels."""
        h, w = self.final
        return h * pixels_per_token, w * pixels_per_token

    def vae_scales(self, patchify: bool) -> tuple[tuple[int, int], ...]:
        """Latent grid per scale: the token grid, doubled under 2x2 spatial patchify (8B)."""
        f = 2 if patchify else 1
        return tuple((h * f, w * f) for h, w in self.scales)


def nearest_template(h_div_w: float) -> float:
    """The official template closest to an aspect ratio (argmin |ratio - template|)."""
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio must be > 0, got {h_div_w}")
    return min(TEMPLATES, key=lambda t: abs(t - h_div_w))


def schedule_for_size(width: int, height: int, pn: str | None = None) -> ScaleSchedule:
    """Snap a requested pixel size to the nearest template; pick pn by pixel count if not given."""
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive, got {width}x{height}")
    template = nearest_template(height / width)
    if pn is None:
        pixels = width * height

        def distance(p: str) -> float:
            h, w = ScaleSchedule.official(template, p).image_size()
            return abs(h * w - pixels)

        pn = min(PN_SCALES, key=distance)
    return ScaleSchedule.official(template, pn)
