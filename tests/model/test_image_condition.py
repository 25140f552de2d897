"""model/image_condition.py: geometry (cover + centre crop), the strength -> forced scales mapping, the
majority rule of masks per scale, and the image's bits being the VAE encoder's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import VAE_SIZES
from model.image_condition import ImageCondition, fit_to, forced_scales, prepare
from model.schedules import ScaleSchedule
from tests.conftest import make_vae

VAE_SCALES = ((1, 1), (2, 2), (4, 4))  # tiny VAE (stride 4): a 16x16 image


@pytest.fixture(scope="module")
def vae():
    return make_vae(VAE_SIZES["tiny"])


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("strength,n,forced", [(0.0, 7, 7), (1.0, 7, 0), (0.5, 6, 3), (0.3, 10, 7), (0.99, 13, 0)])
def test_strength_picks_how_many_scales_are_the_images(strength, n, forced):
    assert forced_scales(strength, n) == forced


def test_fit_covers_then_crops_the_centre_without_distortion():
    wide = np.zeros((10, 40, 3), np.uint8)
    wide[:, 15:25] = 255  # a white centre band, 10 px wide
    fitted = np.asarray(fit_to(Image.fromarray(wide), (20, 20), Image.Resampling.NEAREST))
    assert fitted.shape == (20, 20, 3)
    assert fitted[:, :, 0].mean() == 255  # scale 2x -> 80 wide, crop 30..50: exactly the band
    tall = fit_to(Image.fromarray(np.zeros((40, 10, 3), np.uint8)), (16, 8), Image.Resampling.NEAREST)
    assert tall.size == (16, 8)


@pytest.mark.parametrize(
    "bad,field",
    [
        (dict(image=np.zeros((4, 4), np.uint8)), "image"),
        (dict(image=np.zeros((4, 4, 3), np.float32)), "image"),
        (dict(image=np.zeros((4, 4, 3), np.uint8), mask=np.zeros((4, 5), bool)), "mask"),
        (dict(image=np.zeros((4, 4, 3), np.uint8), strength=1.5), "strength"),
        (dict(image=np.zeros((4, 4, 3), np.uint8), strength=float("nan")), "strength"),
    ],
)
def test_bad_conditions_are_refused_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        ImageCondition(**bad)


def test_a_variation_forces_whole_scales_and_its_bits_are_the_encoders(vae):
    image = _image(16, 16)
    forced = prepare(ImageCondition(image, strength=0.4), vae, VAE_SCALES, len(VAE_SCALES))
    assert [bool(w.all()) for w in forced.where] == [True, True, False]  # round(0.6 * 3) = 2
    assert [bool(w.any()) for w in forced.where] == [True, True, False]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    want = vae.encode_bits(pixels, VAE_SCALES).bits
    assert all(torch.equal(a, b[0]) for a, b in zip(forced.bits, want, strict=True))


def test_a_mask_frees_only_the_positions_it_mostly_covers(vae):
    mask = np.zeros((16, 16), bool)
    mask[:, 10:] = True  # the right 6 of 16 columns (37.5%)
    forced = prepare(ImageCondition(_image(16, 16), mask), vae, VAE_SCALES, len(VAE_SCALES))
    assert forced.where[0].all()  # the 1x1 scale: mostly kept, so forced
    assert forced.where[1][:, 0].all() and not forced.where[1][:, 1].any()  # 2x2: the right column is 75% masked
    assert forced.where[2][:, :2].all() and not forced.where[2][:, 3].any()  # 4x4: the last column is edited
    assert forced.where[2][:, 2].all()  # column 2 (pixels 8-11) is only half masked: kept


def test_a_larger_image_of_another_aspect_is_fitted_to_the_schedule(vae):
    schedule = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4)))
    scales = schedule.vae_scales(False)
    forced = prepare(ImageCondition(_image(30, 50)), vae, scales, schedule.num_scales)
    assert [tuple(b.shape) for b in forced.bits] == [(1, 1, 8), (2, 2, 8), (4, 4, 8)]
