"""A generation a scale at a time (`InfinityPipeline.start`): stepped between other generations'
scales, as the continuous batcher runs them, it makes the same images as `generate` alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from model.config import SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.text_encoder import T5TextEncoder

SMALL = ScaleSchedule.official(1.0, "0.06M")
WIDE = ScaleSchedule.official(0.5, "0.06M")


@pytest.fixture(scope="module")
def pipe(t5_dir, tiny_transformer, tiny_vae):
    return InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir))


def test_interleaved_generations_make_the_images_each_makes_alone(pipe):
    params = [SamplingParams(seed=5, cfg=3.0, tau=1.0), SamplingParams(seed=6, cfg=(3.0,) * 6 + (1.0,), tau=1.0)]
    alone_a = pipe.generate(["a red circle", "two blue squares"], SMALL, params)
    alone_b = pipe.generate(["a green star"], WIDE, SamplingParams(seed=9, cfg=4.0, tau=1.0))
    a = pipe.start(["a red circle", "two blue squares"], SMALL, params)
    a.step()
    a.step()
    b = pipe.start(["a green star"], WIDE, SamplingParams(seed=9, cfg=4.0, tau=1.0))  # joins two scales later
    while not (a.done and b.done):
        for g in (a, b):
            if not g.done:
                g.step()
    for together, alone in ((a.finish(), alone_a), (b.finish(), alone_b)):
        assert together.seeds == alone.seeds
        assert all(np.array_equal(x, y) for x, y in zip(together.images, alone.images, strict=True))
        assert all(np.array_equal(x, y) for x, y in zip(together.bits, alone.bits, strict=True))


def test_a_generation_reports_its_progress_and_drops_rows_between_steps(pipe):
    g = pipe.start(["a red circle", "two blue squares"], SMALL, SamplingParams(seed=2))
    assert g.rows == (0, 1) and not g.done
    event = g.step(lambda e: {0})
    assert event.scale_index == 0 and event.rows == (0, 1)
    assert g.rows == (1,)
    while not g.done:
        g.step()
    result = g.finish()
    assert result.rows == (1,)
    alone = pipe.generate(["a red circle", "two blue squares"], SMALL, SamplingParams(seed=2))
    assert np.array_equal(result.images[0], alone.images[1])
    assert result.timings.transformer > 0 and len(result.timings.scales) == SMALL.num_scales
