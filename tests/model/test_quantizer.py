import math

import pytest
import torch
import torch.nn.functional as F

from model.config import VAE_SIZES, VAEConfig
from model.quantizer import BitwiseQuantizer, resample
from model.schedules import ScaleSchedule

SCALES = ScaleSchedule.official(1.0, "0.06M").scales


def random_bits(shape, seed=0):
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed))


def test_codes_are_signed_unit_vectors():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    bits = random_bits((2, 3, 4, 8))
    codes = q.codes(bits, 0)  # (B, d, h, w)
    assert codes.shape == (2, 8, 3, 4)
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, 8**-0.5))
    assert torch.equal((codes > 0).long().permute(0, 2, 3, 1), bits)
    torch.testing.assert_close(codes.norm(dim=1), torch.ones(2, 3, 4))


def test_bits_to_codes_to_bits_round_trip():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    bits = random_bits((2, 5, 5, 8), seed=3)
    assert torch.equal(q.binarize(q.codes(bits, 0)), bits)


def test_encode_then_rebuild_gives_the_quantized_latent():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    latent = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(1))
    enc = q.encode(latent, SCALES)
    assert [tuple(b.shape[1:3]) for b in enc.bits] == list(SCALES)
    rebuilt = q.bits_to_latent(enc.bits, SCALES)
    torch.testing.assert_close(rebuilt, enc.quantized, atol=1e-6, rtol=0)
    # residual quantization converges: the quantized latent is closer than a one-scale code
    assert (latent - enc.quantized).pow(2).mean() < latent.pow(2).mean()


def test_single_scale_encode_recovers_the_bits():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    bits = random_bits((1, 6, 6, 8), seed=4)
    enc = q.encode(q.codes(bits, 0), ((6, 6),))
    assert torch.equal(enc.bits[0], bits)


def test_teacher_inputs_are_bilinear_downsamples_of_the_running_sum():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    bits = [random_bits((1, h, w, 8), seed=i) for i, (h, w) in enumerate(SCALES)]
    inputs = q.teacher_inputs(bits, SCALES)
    assert inputs.shape == (1, sum(h * w for h, w in SCALES) - 1, 8)
    summed = sum(
        torch.nn.functional.interpolate(q.codes(b, k), size=(16, 16), mode="bilinear", align_corners=False)
        for k, b in enumerate(bits[:3])
    )
    expected = torch.nn.functional.interpolate(summed, size=SCALES[3], mode="bilinear", align_corners=False)
    start = sum(h * w for h, w in SCALES[1:3])
    got = inputs[0, start : start + 36].T.reshape(8, 6, 6)
    torch.testing.assert_close(got, expected[0], atol=1e-6, rtol=0)


def test_area_down_sampling_is_adaptive_average_pooling():
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(resample(x, (6, 6), "area"), torch.nn.functional.adaptive_avg_pool2d(x, 6))


def test_patchify_layout_matches_the_official_pixel_shuffle():
    q = BitwiseQuantizer(VAEConfig(bits=2, base_channels=32, channel_mult=(1, 2), spatial_patchify=True))
    token = torch.zeros(1, 1, 1, 8, dtype=torch.long)
    token[0, 0, 0, 1 * 4 + 2 * 1 + 0] = 1  # channel 1, sub-pixel row 1, col 0
    latent = q.to_latent_layout(token)  # (1, 2, 2, 2)
    assert latent.shape == (1, 2, 2, 2)
    assert latent[0, 1, 0, 1] == 1 and latent.sum() == 1
    codes = q.codes(random_bits((1, 4, 6, 2)), 0)
    tokens = q.to_token_layout(codes)  # (1, 2*3, 8)
    back = q.to_latent_layout(tokens.reshape(1, 2, 3, 8))
    assert torch.equal(back.permute(0, 3, 1, 2), codes)


def test_code_decay_is_explicit_and_off_by_default():
    assert VAE_SIZES["d32"].code_decay == 1.0
    q = BitwiseQuantizer(VAEConfig(bits=8, base_channels=32, channel_mult=(1, 2), code_decay=0.5))
    bits = random_bits((1, 2, 2, 8))
    torch.testing.assert_close(q.codes(bits, 2).abs(), torch.full((1, 8, 2, 2), 0.25 * 8**-0.5))


@pytest.mark.parametrize("name", ["tiny", "d14-patchify", "d32"])
def test_codes_are_the_official_expression_bit_for_bit(name):
    """(2 bit - 1) / sqrt(d), then l2-normalised over d. In float32 the normalisation moves codes by an ulp
    (every code for d = 8, 14, 32), so it is part of the official value, not a no-op to drop."""
    config = VAE_SIZES[name]
    d = config.bits
    bits = random_bits((2, 3, 4, d), seed=d)
    official = F.normalize((bits.float() * 2 - 1) * (1 / math.sqrt(d)), dim=-1).permute(0, 3, 1, 2)
    assert torch.equal(BitwiseQuantizer(config).codes(bits, 0), official)


@pytest.mark.parametrize("decay", [1.0, 0.5, 2.0])
def test_codes_of_scale_k_have_the_configs_magnitude(decay):
    config = VAEConfig(bits=8, base_channels=32, channel_mult=(1, 2), code_decay=decay)
    q = BitwiseQuantizer(config)
    bits = random_bits((1, 2, 2, 8))
    for k in (0, 1, 3):
        torch.testing.assert_close(q.codes(bits, k).abs(), torch.full((1, 8, 2, 2), config.code_scale(k)))
        assert torch.equal(q.codes(bits, k) > 0, q.codes(bits, 0) > 0)


def signed_codes(bits: torch.Tensor, scale: float) -> torch.Tensor:
    """Latent-layout bits (B, h, w, d) -> (B, d, h, w) codes +-scale, written from the paper's definition."""
    return (bits.float() * 2 - 1).permute(0, 3, 1, 2) * scale


def test_every_accumulation_weighs_scale_k_by_its_decay():
    q = BitwiseQuantizer(VAEConfig(bits=8, base_channels=32, channel_mult=(1, 2), code_decay=0.5))
    bits = [random_bits((1, h, w, 8), seed=10 + i) for i, (h, w) in enumerate(SCALES)]

    def decayed_sum(bits, upto):
        return sum(
            F.interpolate(signed_codes(b, 0.5**k / math.sqrt(8)), size=(16, 16), mode="bilinear", align_corners=False)
            for k, b in enumerate(bits[:upto])
        )

    torch.testing.assert_close(q.bits_to_latent(bits, SCALES), decayed_sum(bits, len(SCALES)), atol=1e-6, rtol=0)
    inputs = q.teacher_inputs(bits, SCALES)
    start = sum(h * w for h, w in SCALES[1:3])
    expected = F.interpolate(decayed_sum(bits, 3), size=SCALES[3], mode="bilinear", align_corners=False)
    torch.testing.assert_close(inputs[0, start : start + 36].T.reshape(8, 6, 6), expected[0], atol=1e-6, rtol=0)
    enc = q.encode(torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(2)), SCALES)
    for row in range(2):
        torch.testing.assert_close(
            enc.quantized[row : row + 1],
            decayed_sum([b[row : row + 1] for b in enc.bits], len(SCALES)),
            atol=1e-6,
            rtol=0,
        )


def test_binarize_is_strictly_positive_after_normalising_each_position_over_its_channels():
    """Official BSQ: u = r / ||r|| over the d channels of each position, bit = u > 0 (an exact 0 gives 0)."""
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    residual = torch.zeros(1, 8, 2, 2)
    residual[0, 0, 0, 0], residual[0, 1, 0, 0] = 1e-30, 1.0  # tiny but positive beside a unit channel: 1
    residual[0, :, 1, 0] = 1e16  # a huge position below: not in (0, 0)'s norm
    expected = torch.zeros(1, 2, 2, 8, dtype=torch.long)
    expected[0, 0, 0, :2] = 1
    expected[0, 1, 0, :] = 1
    assert torch.equal(q.binarize(residual), expected)


def test_resampling_to_the_same_size_is_skipped_as_official():
    """The official code skips the interpolate calls at full size. Trilinear to the same size would
    compute 1 * x + 0 * neighbour, turning a neighbour's inf into NaN."""
    x = torch.randn(1, 2, 4, 4)
    x[0, 0, 1, 1] = float("inf")
    for mode in ("bilinear", "area"):
        assert torch.equal(resample(x, (4, 4), mode), x)


def test_encode_names_a_latent_that_is_not_the_final_scale():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    with pytest.raises(ValueError, match=r"latent \(16, 16\) != final scale \(6, 6\)"):
        q.encode(torch.zeros(1, 8, 16, 16), SCALES[:4])
