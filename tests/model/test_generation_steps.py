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


def _run(g) -> None:
    while not g.done:
        g.step()


@pytest.mark.parametrize(
    "first, second",
    [
        # guided, different cfg/tau/seeds and prompt lengths (the text is padded on merging)
        (
            [SamplingParams(seed=1, cfg=3.0, tau=1.0), SamplingParams(seed=2, cfg=5.0, tau=0.5, top_k=1)],
            [SamplingParams(seed=3, cfg=2.0, tau=1.0, negative_prompt="a blue star")],
        ),
        # unguided (cfg 1 throughout): one model row per image
        ([SamplingParams(seed=4, cfg=1.0, tau=1.0)], [SamplingParams(seed=5, cfg=1.0, tau=1.0)] * 2),
    ],
)
def test_a_generation_that_caught_up_merges_and_every_image_stays_its_own(pipe, first, second):
    prompts_a = ["a red circle", "two blue squares"][: len(first)]
    prompts_b = ["the big small green triangle to the left of a star", "a star"][: len(second)]
    alone_a = pipe.generate(prompts_a, SMALL, first)
    alone_b = pipe.generate(prompts_b, SMALL, second)
    a = pipe.start(prompts_a, SMALL, first)
    for _ in range(3):
        a.step()
    b = pipe.start(prompts_b, SMALL, second)
    assert not a.can_absorb(b)  # b is still at scale 0
    for _ in range(3):
        b.step()
    assert a.can_absorb(b) and a.scale_index == b.scale_index == 3
    a.absorb(b)
    assert a.rows == tuple(range(len(first) + len(second)))
    _run(a)
    merged = a.finish()
    n = len(first)
    assert merged.seeds == alone_a.seeds + alone_b.seeds
    for k, image in enumerate(alone_a.images + alone_b.images):
        assert np.array_equal(merged.images[k], image), k
    for s, bits in enumerate(merged.bits):
        assert np.array_equal(bits[:n], alone_a.bits[s]) and np.array_equal(bits[n:], alone_b.bits[s])


def test_rows_dropped_before_a_merge_stay_dropped_and_the_rest_keep_their_images(pipe):
    params = [SamplingParams(seed=s, cfg=3.0, tau=1.0) for s in (1, 2)]
    alone = pipe.generate(["a red circle", "a star"], SMALL, params)
    a = pipe.start(["a red circle"], SMALL, params[:1])
    a.step()
    a.step()
    b = pipe.start(["a green star", "a star"], SMALL, [SamplingParams(seed=9, cfg=3.0, tau=1.0), params[1]])
    b.step(lambda e: {0})  # its first row is cancelled
    b.step()
    a.absorb(b)
    assert a.rows == (0, 2)  # b's row 1 is the merged batch's row 1 + 1
    _run(a)
    result = a.finish()
    assert result.rows == (0, 2)
    assert all(np.array_equal(x, y) for x, y in zip(result.images, alone.images, strict=True))


def test_only_generations_at_the_same_scale_of_the_same_schedule_and_guidance_merge(pipe):
    guided = SamplingParams(seed=1, cfg=3.0)
    a = pipe.start(["a red circle"], SMALL, guided)
    a.step()
    other_schedule = pipe.start(["a red circle"], WIDE, guided)
    unguided = pipe.start(["a red circle"], SMALL, SamplingParams(seed=1, cfg=1.0))
    same = pipe.start(["a star"], SMALL, guided)
    for g in (other_schedule, unguided, same):
        g.step()
    assert not a.can_absorb(other_schedule) and not a.can_absorb(unguided) and not a.can_absorb(a)
    assert a.can_absorb(same)
    same.step()
    assert not a.can_absorb(same)  # one scale ahead


def test_an_image_to_image_row_merges_with_a_text_row_and_keeps_its_forced_bits(pipe):
    from model.image_condition import ImageCondition

    source = pipe.generate(["a red circle"], SMALL, SamplingParams(seed=3)).images[0]
    edit, text = SamplingParams(seed=7, cfg=3.0, tau=1.0), SamplingParams(seed=8, cfg=3.0, tau=1.0)
    condition = ImageCondition(source, strength=0.5)
    alone_edit = pipe.generate(["two blue squares"], SMALL, edit, images=[condition])
    alone_text = pipe.generate(["a star"], SMALL, text)
    for first, second in (("text", "edit"), ("edit", "text")):  # either side may be the forced one
        starts = {
            "text": lambda: pipe.start(["a star"], SMALL, text),
            "edit": lambda: pipe.start(["two blue squares"], SMALL, edit, images=[condition]),
        }
        a, b = starts[first](), starts[second]()
        for g in (a, b):
            g.step()
            g.step()
        a.absorb(b)
        _run(a)
        result = a.finish()
        expected = {"text": alone_text.images[0], "edit": alone_edit.images[0]}
        assert np.array_equal(result.images[0], expected[first]) and np.array_equal(result.images[1], expected[second])


def test_finishing_in_parts_decodes_each_part_alone_and_the_parts_combine_into_the_whole(pipe):
    from model.pipeline import GenerationResult

    prompts = ["a red circle", "two blue squares", "a star"]
    params = [SamplingParams(seed=s, cfg=3.0, tau=1.0) for s in (1, 2, 3)]
    whole = pipe.generate(prompts, SMALL, params)
    g = pipe.start(prompts, SMALL, params)
    _run(g)
    parts = [g.finish([2]), g.finish([0, 1])]  # any order, disjoint
    assert [p.rows for p in parts] == [(2,), (0, 1)]
    assert np.array_equal(parts[0].images[0], whole.images[2])
    combined = GenerationResult.combine(parts)
    assert combined.rows == (2, 0, 1) and combined.seeds == [3, 1, 2]
    for k, row in enumerate(combined.rows):
        assert np.array_equal(combined.images[k], whole.images[row])
        assert all(np.array_equal(b[k], w[row]) for b, w in zip(combined.bits, whole.bits, strict=True))
    assert combined.timings.vae_decode == sum(p.timings.vae_decode for p in parts)
