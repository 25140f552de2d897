"""Image-to-image through the pipeline: forced bits are the image's, strength 0 is the VAE round trip,
strength 1 is plain generation, masks keep what they do not cover, and a row's image never depends on
its batch."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.attention import TextMemory
from model.config import SamplingParams
from model.image_condition import ImageCondition, fit_to
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.text_encoder import T5TextEncoder
from model.vae import to_uint8

SCHEDULE = ScaleSchedule.official(1.0, "0.06M")  # 7 scales, 64x64 images with the tiny VAE
PARAMS = SamplingParams(cfg=3.0, tau=1.0, seed=11)


@pytest.fixture(scope="module")
def pipe(t5_dir, tiny_transformer, tiny_vae):
    return InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir))


@pytest.fixture(scope="module")
def source(pipe) -> np.ndarray:
    """An input of another size and aspect than the schedule's 64x64 (fitted: cover, centre crop)."""
    return pipe.generate(["a red circle"], SCHEDULE, SamplingParams(seed=3)).images[0].repeat(2, 0)  # 128x64


def _round_trip(pipe: InfinityPipeline, image: np.ndarray) -> np.ndarray:
    from PIL import Image

    fitted = np.array(fit_to(Image.fromarray(image), (64, 64), Image.Resampling.LANCZOS))
    pixels = torch.from_numpy(fitted).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.inference_mode():
        return to_uint8(pipe.vae.reconstruct(pixels, SCHEDULE.vae_scales(False)))[0].numpy()


def test_strength_0_is_the_vae_round_trip_of_the_input(pipe, source):
    out = pipe.generate(["two blue squares"], SCHEDULE, PARAMS, images=[ImageCondition(source, strength=0.0)])
    assert np.array_equal(out.images[0], _round_trip(pipe, source))
    assert out.timings.image_encode > 0


def test_strength_1_ignores_the_input_and_the_middle_keeps_its_first_scales(pipe, source):
    plain = pipe.generate(["two blue squares"], SCHEDULE, PARAMS)
    ignored = pipe.generate(["two blue squares"], SCHEDULE, PARAMS, images=[ImageCondition(source, strength=1.0)])
    assert all(np.array_equal(a, b) for a, b in zip(plain.bits, ignored.bits, strict=True))
    half = pipe.generate(["two blue squares"], SCHEDULE, PARAMS, images=[ImageCondition(source, strength=0.5)])
    exact = pipe.generate(["two blue squares"], SCHEDULE, PARAMS, images=[ImageCondition(source, strength=0.0)])
    forced = round(0.5 * SCHEDULE.num_scales)  # 4 of 7 (round half to even: 3.5 -> 4)
    assert all(np.array_equal(half.bits[k], exact.bits[k]) for k in range(forced))
    assert not np.array_equal(half.bits[forced], exact.bits[forced])


def test_a_masked_edit_keeps_the_bits_and_pixels_outside_the_mask(pipe, source):
    mask = np.zeros(source.shape[:2], bool)
    mask[:, 32:] = True  # the right half
    edit = ImageCondition(source, mask)
    pure = ImageCondition(source, mask, paste=False)
    exact = pipe.generate(["x"], SCHEDULE, PARAMS, images=[ImageCondition(source, strength=0.0)])
    out = pipe.generate(["two blue squares", "two blue squares"], SCHEDULE, PARAMS, images=[edit, pure])
    last = out.bits[-1]  # (2, 8, 8, d) at the finest scale: columns 0-3 kept, 4-7 edited
    assert np.array_equal(last[:, :, :4], exact.bits[-1][[0, 0], :, :4])
    assert not np.array_equal(last[:, :, 4:], exact.bits[-1][[0, 0], :, 4:])
    round_trip = _round_trip(pipe, source)
    from PIL import Image

    fitted = np.array(fit_to(Image.fromarray(source), (64, 64), Image.Resampling.LANCZOS))
    assert np.array_equal(out.images[0][:, : 32 - 3], fitted[:, : 32 - 3])  # pasted: the input, to the feather
    assert not np.array_equal(out.images[1][:, :29], fitted[:, :29])  # pure decode: the round trip's pixels
    # Pure decode: the kept half is nearer the round trip than the edited half (edited coarse codes are
    # upsampled across the whole latent, so it is not equal: docs/image-to-image.md measures it).
    diff = np.abs(out.images[1].astype(int) - round_trip)
    assert diff[:, :24].mean() < diff[:, 40:].mean()


def test_an_image_row_gives_the_same_image_alone_and_in_a_batch(pipe, source):
    cond = ImageCondition(source, strength=0.4)
    alone = pipe.generate(["a green star"], SCHEDULE, PARAMS, images=[cond])
    batch = pipe.generate(
        ["two blue squares", "a green star", "x"],
        SCHEDULE,
        [SamplingParams(seed=1), PARAMS, SamplingParams(seed=2)],
        images=[None, cond, ImageCondition(source, strength=0.0)],
    )
    assert np.array_equal(alone.images[0], batch.images[1])


def test_an_empty_prompt_needs_an_image(pipe, source):
    with pytest.raises(ValueError, match="empty only"):
        pipe.generate([""], SCHEDULE, PARAMS)
    out = pipe.generate([""], SCHEDULE, PARAMS, images=[ImageCondition(source, strength=0.6)])
    assert out.images[0].shape == (64, 64, 3)
    with pytest.raises(ValueError, match="`images` has 2"):
        pipe.generate(["a"], SCHEDULE, PARAMS, images=[None, None])


def test_official_format_checkpoints_vary_an_image(official_files, t5_dir, source):
    """The 2B path end to end: files in the official layout, loaded as a user would, strength 0 exact."""
    from weights import load_pipeline

    loaded = load_pipeline(official_files["transformer"], official_files["vae"], t5_dir)
    out = loaded.generate(["a red circle"], SCHEDULE, PARAMS, images=[ImageCondition(source, strength=0.0)])
    assert np.array_equal(out.images[0], _round_trip(loaded, source))


def test_the_patchify_layout_forces_the_images_bits_at_every_scale():
    """The 8B's 2x2 spatial patchify VAE: forced bits live in the latent layout, twice the token grid."""
    from model.config import TRANSFORMER_SIZES, VAE_SIZES
    from model.image_condition import prepare
    from model.sampler import sample
    from tests.conftest import make_transformer, make_vae

    vae = make_vae(VAE_SIZES["tiny-patchify"])
    model = make_transformer(replace(TRANSFORMER_SIZES["tiny"], token_bits=4 * vae.config.bits))
    schedule = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4)))
    scales = schedule.vae_scales(True)
    image = np.random.default_rng(0).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    exact = prepare(ImageCondition(image, strength=0.0), vae, scales, schedule.num_scales)
    half = prepare(ImageCondition(image, strength=0.5), vae, scales, schedule.num_scales)
    text = TextMemory(torch.randn(2, 3, model.config.text_channels), torch.tensor([3, 3]))
    with torch.inference_mode():
        out = sample(
            model, vae.quantizer, schedule, text, model.unconditional_text(text.lengths),
            [SamplingParams(seed=1), SamplingParams(seed=2)], [torch.Generator().manual_seed(i) for i in (1, 2)],
            "sdpa", forced=[exact, half],
        )  # fmt: skip
    assert [tuple(b.shape[1:3]) for b in out.bits] == list(scales)
    assert all(torch.equal(out.bits[k][0].long(), exact.bits[k]) for k in range(3))
    assert all(torch.equal(out.bits[k][1].long(), exact.bits[k]) for k in range(2))  # round(0.5 * 3) = 2


def test_a_row_cancelled_mid_flight_leaves_the_image_rows_unchanged(pipe, source):
    """Cancellation drops a row between scales: the others' forced bits follow them (Forcing.select)."""
    mask = np.zeros(source.shape[:2], bool)
    mask[:, 32:] = True
    edit, variation = ImageCondition(source, mask), ImageCondition(source, strength=0.4)
    prompts, params = (
        ["two blue squares", "a green star", "x"],
        [PARAMS, SamplingParams(seed=4), SamplingParams(seed=5)],
    )
    full = pipe.generate(prompts, SCHEDULE, params, images=[variation, None, edit])
    dropped = pipe.generate(
        prompts, SCHEDULE, params, lambda e: {1} if e.scale_index == 2 else None, images=[variation, None, edit]
    )
    assert dropped.rows == (0, 2)
    assert np.array_equal(dropped.images[0], full.images[0]) and np.array_equal(dropped.images[1], full.images[2])
