import torch

from model.config import VAE_SIZES, VAEConfig
from model.quantizer import BitwiseQuantizer, resample
from model.schedules import ScaleSchedule

SCALES = ScaleSchedule.official(1.0, "0.06M").scales


def random_bits(shape, seed=0):
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed))


def test_codes_are_signed_unit_vectors():
    q = BitwiseQuantizer(VAE_SIZES["tiny"])
    bits = random_bits((2, 3, 4, 8))
    codes = q.codes(bits, 0)                                   # (B, d, h, w)
    assert codes.shape == (2, 8, 3, 4)
    torch.testing.assert_close(codes.abs(), torch.full_like(codes, 8 ** -0.5))
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
    summed = sum(torch.nn.functional.interpolate(q.codes(b, k), size=(16, 16), mode="bilinear",
                                                 align_corners=False) for k, b in enumerate(bits[:3]))
    expected = torch.nn.functional.interpolate(summed, size=SCALES[3], mode="bilinear", align_corners=False)
    start = sum(h * w for h, w in SCALES[1:3])
    got = inputs[0, start:start + 36].T.reshape(8, 6, 6)
    torch.testing.assert_close(got, expected[0], atol=1e-6, rtol=0)


def test_area_down_sampling_is_adaptive_average_pooling():
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(resample(x, (6, 6), "area"), torch.nn.functional.adaptive_avg_pool2d(x, 6))


def test_patchify_layout_matches_the_official_pixel_shuffle():
    q = BitwiseQuantizer(VAEConfig(bits=2, base_channels=32, channel_mult=(1, 2), spatial_patchify=True))
    token = torch.zeros(1, 1, 1, 8, dtype=torch.long)
    token[0, 0, 0, 1 * 4 + 2 * 1 + 0] = 1                     # channel 1, sub-pixel row 1, col 0
    latent = q.to_latent_layout(token)                         # (1, 2, 2, 2)
    assert latent.shape == (1, 2, 2, 2)
    assert latent[0, 1, 0, 1] == 1 and latent.sum() == 1
    codes = q.codes(random_bits((1, 4, 6, 2)), 0)
    tokens = q.to_token_layout(codes)                          # (1, 2*3, 8)
    back = q.to_latent_layout(tokens.reshape(1, 2, 3, 8))
    assert torch.equal(back.permute(0, 3, 1, 2), codes)


def test_code_decay_is_explicit_and_off_by_default():
    assert VAE_SIZES["d32"].code_decay == 1.0
    q = BitwiseQuantizer(VAEConfig(bits=8, base_channels=32, channel_mult=(1, 2), code_decay=0.5))
    bits = random_bits((1, 2, 2, 8))
    torch.testing.assert_close(q.codes(bits, 2).abs(), torch.full((1, 8, 2, 2), 0.25 * 8 ** -0.5))
