import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from model.config import VAE_SIZES
from model.quantizer import BitwiseQuantizer
from training.bsc import corrupted_teacher_batch
from training.detector import detect, score
from training.shapes import (
    CATEGORIES,
    COLOURS,
    HELD_OUT,
    JITTER,
    SHAPES,
    TEMPLATES,
    Obj,
    Scene,
    make_scene,
    render,
    vocabulary,
)


def test_scenes_are_deterministic_by_seed():
    assert make_scene(7) == make_scene(7)
    assert np.array_equal(render(make_scene(7), 64), render(make_scene(7), 64))
    assert make_scene(7) != make_scene(8)


def test_held_out_templates_stay_out_of_training_scenes():
    train = {make_scene(i, held_out=False).template for i in range(600)}
    held = {make_scene(i, held_out=True).template for i in range(300)}
    assert held == set(HELD_OUT.values())
    assert not train & held
    assert sum(len(t) for t in TEMPLATES.values()) * 0.2 == len(HELD_OUT)  # 20% of the templates


def test_training_caption_words_are_the_vocabulary_and_held_out_wording_is_unknown():
    words = set(vocabulary())
    for i in range(500):
        assert set(make_scene(i, held_out=False).caption.split()) <= words
    held_only = set()
    for i in range(500):
        held_only |= set(make_scene(i, held_out=True).caption.split()) - words
    assert held_only == {"the", "beside", "there", "are", "sits", "also"}


def test_captions_say_what_is_drawn():
    s = make_scene(3, "counting")
    assert s.caption.split()[0] in ("two", "three", "four") or s.caption.split()[1] in ("two", "three", "four")
    assert len({(o.colour, o.shape) for o in s.objects}) == 1
    p = make_scene(4, "position")
    a, b = p.objects
    relation = next(r for r in ("left of", "right of", "above", "below") if r in p.caption)
    assert {"left of": a.cx < b.cx, "right of": a.cx > b.cx, "above": a.cy < b.cy, "below": a.cy > b.cy}[relation]


def _gap(a: Obj, b: Obj) -> float:
    """Distance between two objects' bounding circles, as a fraction of the image side."""
    return math.dist((a.cx, a.cy), (b.cx, b.cy)) - (a.size + b.size) / 2


@pytest.mark.parametrize("layout", ["free", "composed"])
def test_objects_never_touch_and_stay_inside(layout):
    for category in CATEGORIES:
        for i in range(150):
            objs = make_scene(i, category, held_out=None, layout=layout).objects
            assert all(o.size / 2 < o.cx < 1 - o.size / 2 and o.size / 2 < o.cy < 1 - o.size / 2 for o in objs)
            assert all(_gap(a, b) > 0.03 for j, a in enumerate(objs) for b in objs[j + 1 :]), (category, i)


def test_composed_layouts_place_objects_as_the_caption_reads():
    for i in range(100):
        (single,) = make_scene(i, "single", layout="composed").objects
        assert abs(single.cx - 0.5) <= JITTER and abs(single.cy - 0.5) <= JITTER
        for category in ("two", "attribution"):
            first, second = make_scene(i, category, layout="composed").objects
            assert first.cx < 0.5 - 0.1 < 0.5 + 0.1 < second.cx  # first named on the left
            assert abs(first.cy - 0.5) <= JITTER and abs(second.cy - 0.5) <= JITTER
        objs = make_scene(i, "counting", layout="composed").objects
        ys = sorted(o.cy for o in objs)
        if len(objs) == 4:  # a 2x2 grid
            assert ys[1] < 0.5 < ys[2] and ys[1] - ys[0] <= 2 * JITTER and ys[3] - ys[2] <= 2 * JITTER
        else:  # a row
            assert ys[-1] - ys[0] <= 2 * JITTER
    # Free layouts do not: the first-named object is as often on the right.
    lefts = [make_scene(i, "two", layout="free").objects for i in range(100)]
    assert 25 < sum(a.cx < b.cx for a, b in lefts) < 75


def test_a_layout_moves_objects_not_captions():
    for i in range(60):
        free, composed = make_scene(i, held_out=None, layout="free"), make_scene(i, held_out=None, layout="composed")
        assert [(o.shape, o.colour) for o in free.objects] == [(o.shape, o.colour) for o in composed.objects]
        assert free.caption == composed.caption


@pytest.mark.parametrize("layout", ["free", "composed"])
@pytest.mark.parametrize("category", CATEGORIES)
def test_detector_scores_the_generators_own_renders_near_100_percent(category, layout):
    scenes = [make_scene(10_000 + i, category, held_out=None, layout=layout) for i in range(40)]
    accuracy = np.mean([score(s, render(s, 128))["correct"] for s in scenes])
    assert accuracy >= 0.95, accuracy


def test_detector_rejects_wrong_images():
    red_circle = make_scene(1, "single")
    blank = np.zeros((128, 128, 3), np.uint8)
    assert detect(blank) == []
    assert not score(red_circle, blank)["correct"]
    other = next(
        make_scene(i, "single")
        for i in range(100)
        if make_scene(i, "single").objects[0].colour != red_circle.objects[0].colour
    )
    assert not score(red_circle, render(other, 128))["colour"]


def test_bitwise_self_correction_labels_correct_the_corrupted_history():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    scales = ((1, 1), (2, 2), (4, 4), (8, 8))
    latent = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    clean = corrupted_teacher_batch(q, latent, scales, 0.0, torch.Generator().manual_seed(1))
    enc = q.encode(latent, scales)
    expected_labels = torch.cat([b.reshape(4, -1, 8) for b in enc.bits], dim=1)
    assert torch.equal(clean.labels, expected_labels)
    torch.testing.assert_close(clean.inputs, q.teacher_inputs(enc.bits, scales))
    noisy = corrupted_teacher_batch(q, latent, scales, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(noisy.labels[:, :1], clean.labels[:, :1])  # scale 0 labels are the clean bits
    assert not torch.equal(noisy.inputs, clean.inputs)  # the history was corrupted
    assert not torch.equal(noisy.labels[:, 1:], clean.labels[:, 1:])  # later labels correct it
    # Uncorrupted, the latent is exactly what the sampler decodes from these bits.
    torch.testing.assert_close(clean.latent, q.bits_to_latent(enc.bits, scales))


def test_flipping_the_last_scale_changes_only_what_is_decoded():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    scales = ((1, 1), (2, 2), (4, 4), (8, 8))
    latent = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    kept = corrupted_teacher_batch(q, latent, scales, 0.3, torch.Generator().manual_seed(5))
    flipped = corrupted_teacher_batch(q, latent, scales, 0.3, torch.Generator().manual_seed(5), flip_last=True)
    assert torch.equal(flipped.inputs, kept.inputs) and torch.equal(flipped.labels, kept.labels)
    last = q.codes(q.binarize(torch.zeros(4, 8, 8, 8)), len(scales) - 1)  # one last-scale code's magnitude
    difference = (flipped.latent - kept.latent).abs()
    assert difference.max() > 0  # some last-scale bits flipped ...
    torch.testing.assert_close(difference[difference > 0], 2 * last.abs().max().expand(int((difference > 0).sum())))


def _blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


@pytest.mark.parametrize("sigma", [0.0, 0.6])
def test_detector_names_every_shape_at_the_eval_resolution_sharp_or_soft(sigma):
    """At 64x64 (the default model's size), soft edges must not turn stars into circles."""
    rng = np.random.default_rng(0)
    correct = 0
    for i in range(80):
        shape, colour = SHAPES[i % 4], list(COLOURS)[i % 12]
        obj = Obj(shape, colour, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.16, 0.32))
        found = detect(_blurred(render(Scene("", "single", "", ("black", "navy")[i % 2], (obj,)), 64), sigma))
        correct += bool(found) and (found[0].shape, found[0].colour) == (shape, colour)
    assert correct / 80 >= 0.95, correct


def test_detector_rejects_the_wrong_shape():
    """Power: the same scene drawn with another shape is judged wrong, for every pair of shapes."""
    for shape in SHAPES:
        for other in SHAPES:
            if other != shape:
                truth = Scene("", "single", "", "navy", (Obj(shape, "red", 0.5, 0.5, 0.26),))
                drawn = Scene("", "single", "", "navy", (Obj(other, "red", 0.5, 0.5, 0.26),))
                assert not score(truth, render(drawn, 64))["shape"], (shape, other)
