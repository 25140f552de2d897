"""What crosses the engine seam: a request in, previews and an output back.

Only plain dataclasses and numpy images: the routes never see tensors and the model never sees HTTP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model.config import SamplingParams
from model.image_condition import ImageCondition
from model.schedules import ScaleSchedule


@dataclass(frozen=True)
class Preview:
    scale_index: int
    num_scales: int
    images: list[np.ndarray]  # one per image of the request still running


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: str
    schedule: ScaleSchedule
    params: tuple[SamplingParams, ...]  # one per image, each with its seed
    deadline: float  # time.monotonic() by which it must finish
    preview_scales: frozenset[int] = frozenset()
    on_preview: Callable[[Preview], None] | None = None
    condition: ImageCondition | None = None  # image-to-image: the input of every image of this request

    @property
    def images(self) -> int:
        return len(self.params)

    @property
    def guided(self) -> bool:
        """Any image uses classifier-free guidance at some scale (its KV cache then holds two rows)."""
        return any(p.uses_guidance(self.schedule.num_scales) for p in self.params)


@dataclass(frozen=True)
class GenerationOutput:
    schedule: ScaleSchedule  # what was generated (the requested size snapped)
    images: list[np.ndarray]  # (H, W, 3) uint8 RGB
    seeds: list[int]
    width: int
    height: int
    prompt_tokens: int
    image_tokens: int  # per image
    timings: dict[str, float]  # seconds: queue_wait, text_encode, transformer, vae_decode
