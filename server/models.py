"""The models one server serves: each with its own engine (queue, batcher, replicas) and limits.

A request names its model (`model`), or gets the first one. Engines share nothing but the app's
metrics registry, where each writes only its own `model`-labelled series: a slow model's queue never
delays another, and one model's dead workers leave the others serving. Lifecycle calls (drain,
readiness) go to every engine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from model.schedules import PN_NAMES, TEMPLATES, ScaleSchedule
from server.engine import Engine
from server.errors import model_not_found
from server.metrics import Metrics
from server.service import ModelLimits


@dataclass(frozen=True)
class ServedModel:
    limits: ModelLimits
    engine: Engine

    @property
    def name(self) -> str:
        return self.limits.name

    @property
    def allowed_budgets(self) -> list[str]:
        """The pixel budgets a request may ask for (up to `max_pn`), smallest first."""
        return list(PN_NAMES[: PN_NAMES.index(self.limits.max_pn) + 1])

    def template_sizes(self) -> list[tuple[float, dict[str, tuple[int, int]]]]:
        """(h_div_w, {pixel budget: (width, height)}) of every official template, tallest first (a
        model trained for one schedule only makes none of them: see `limits.fixed_schedule`)."""
        size, budgets = self.engine.image_size, self.allowed_budgets
        return [
            (t, {pn: width_height(size(ScaleSchedule.official(t, pn))) for pn in budgets})
            for t in sorted(TEMPLATES, reverse=True)
        ]

    def card(self) -> dict:
        """Its `/v1/models` entry: OpenAI's fields, then what it can make (`templates`: the size each
        aspect ratio gives at each pixel budget, what the playground offers; empty for a one-size model)."""
        limits = self.limits
        templates = self.template_sizes() if limits.fixed_schedule is None else []
        if limits.fixed_schedule is not None:
            fixed = width_height(self.engine.image_size(limits.fixed_schedule))
            budgets, sizes = [limits.fixed_schedule.pn], [_wxh(fixed)]
        else:
            budgets = self.allowed_budgets
            sizes = sorted({_wxh(wh) for _, by_pn in templates for wh in by_pn.values()})
        return {
            "id": self.name,
            "object": "model",
            "created": 0,
            "owned_by": "infinity-serve",
            "pixel_budgets": budgets,
            "default_pn": limits.default_pn if limits.fixed_schedule is None else limits.fixed_schedule.pn,
            "sizes": sizes,
            "templates": [
                {"aspect_ratio": aspect_label(t), "h_div_w": t, "sizes": {pn: _wxh(wh) for pn, wh in by_pn.items()}}
                for t, by_pn in templates
            ],
            "token_bits": self.engine.token_bits,
        }


def aspect_label(h_div_w: float) -> str:
    """Official template (h / w, e.g. 1.333) -> "W:H" in small integers ("3:4"), as `aspect_ratio` takes it."""
    ratio = Fraction(1 / h_div_w).limit_denominator(8)
    return f"{ratio.numerator}:{ratio.denominator}"


def width_height(height_width: tuple[int, int]) -> tuple[int, int]:
    """The engine's (height, width) -> (width, height), the order every response gives."""
    h, w = height_width
    return w, h


def _wxh(size: tuple[int, int]) -> str:
    w, h = size
    return f"{w}x{h}"


class ServedModels:
    """The served models by name, the first being the default; the engine lifecycle over all of them."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        names = [m.name for m in models]
        assert models and len(set(names)) == len(names), f"models need distinct names, got {names}"
        self._models = {m.name: m for m in models}
        self.default = models[0]
        self.metrics: Metrics = self.default.engine.metrics.owner
        assert all(m.engine.metrics.owner is self.metrics for m in models), "engines share one registry"

    @classmethod
    def one(cls, engine: Engine, limits: ModelLimits) -> ServedModels:
        return cls([ServedModel(limits, engine)])

    def __iter__(self):
        return iter(self._models.values())

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def pick(self, name: str | None) -> ServedModel:
        """The model a request names (None: the first); 404 `model_not_found` naming the served ones."""
        if name is None:
            return self.default
        model = self._models.get(name)
        if model is None:
            raise model_not_found(name, self.names)
        return model

    # ---- lifecycle, over every engine ----
    @property
    def ready(self) -> bool:
        return all(m.engine.ready for m in self)

    @property
    def broken(self) -> bool:
        """Every model's engine is broken: only a new process can serve again. One broken model of
        several leaves the others serving (it shows in /readyz)."""
        return all(m.engine.broken for m in self)

    def readiness(self) -> dict[str, bool]:
        return {m.name: m.engine.ready for m in self}

    def begin_drain(self, deadline: float) -> int:
        return sum(m.engine.begin_drain(deadline) for m in self)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(m.engine.wait_idle(max(0.0, deadline - time.monotonic())) for m in self)

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self.begin_drain(deadline)  # every queue refused at once, then each engine finishes its work
        return all([m.engine.drain(max(0.0, deadline - time.monotonic())) for m in self])

    def observe_memory(self) -> None:
        for m in self:
            m.engine.observe_memory()
