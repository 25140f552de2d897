"""model/vae.py at tiny sizes: encoder/decoder shapes, the official layout facts (vae fact sheet 6, 8),
the uint8 conversion and the bits round trip. The quantizer alone is tested in test_quantizer.py."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model.config import VAE_SIZES
from model.quantizer import EncodedBits
from model.schedules import ScaleSchedule
from model.vae import BitwiseVAE, Downsample, Upsample, to_uint8
from tests.conftest import make_vae

TINY, PATCHIFY = VAE_SIZES["tiny"], VAE_SIZES["tiny-patchify"]
SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4)))  # token grids; a 4x4 latent for tiny


@pytest.fixture(scope="module")
def vae() -> BitwiseVAE:
    return make_vae(TINY)


@pytest.fixture(scope="module")
def patchify_vae() -> BitwiseVAE:
    return make_vae(PATCHIFY)


def _images(batch, size, seed=0) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latent(batch, bits, size, seed=0) -> torch.Tensor:
    return torch.randn(batch, bits, *size, generator=torch.Generator().manual_seed(seed)) * 0.3


# ---- shapes -----------------------------------------------------------------------------------
def test_encoder_and_decoder_shapes(vae):
    assert TINY.stride == 4
    with torch.no_grad():
        latent = vae.encode_latent(_images(2, (16, 12)))
        assert latent.shape == (2, TINY.bits, 4, 3) and latent.dtype == torch.float32
        image = vae.decode(latent)
    assert image.shape == (2, 3, 16, 12) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1  # decode clamps


def test_a_one_pixel_latent_decodes_to_one_stride_square(vae):
    with torch.no_grad():
        assert vae.decode(_latent(1, TINY.bits, (1, 1))).shape == (1, 3, 4, 4)


def test_decode_computes_in_the_decoders_dtype_and_returns_float32():
    vae = make_vae(TINY)
    vae.decoder.to(torch.bfloat16)
    with torch.no_grad():
        image = vae.decode(_latent(1, TINY.bits, (4, 4)))
        half = vae.decoder(_latent(1, TINY.bits, (4, 4)).bfloat16())
    assert image.dtype == torch.float32
    assert torch.equal(image, half.float().clamp(-1, 1))


def test_decoding_a_batch_matches_decoding_each_image_alone(vae):
    latent = _latent(3, TINY.bits, (4, 4), seed=1)
    with torch.no_grad():
        together = vae.decode(latent)
        alone = torch.cat([vae.decode(latent[i : i + 1]) for i in range(3)])
    # Close, not bitwise: conv kernels sum in another order at another batch size, which is why the
    # pipeline decodes one image at a time (InfinityPipeline.decode_latent).
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)
    assert (together[0] - together[1]).abs().max() > 0.05  # and the images do differ


# ---- official layout --------------------------------------------------------------------------
def test_levels_blocks_and_resamplers_follow_the_official_layout(vae):
    levels = len(TINY.channel_mult)
    assert [len(level.block) for level in vae.encoder.down] == [TINY.num_res_blocks] * levels
    assert [len(level.block) for level in vae.decoder.up] == [TINY.num_res_blocks + 1] * levels  # one more
    assert [hasattr(level, "downsample") for level in vae.encoder.down] == [True] * (levels - 1) + [False]
    assert [hasattr(level, "upsample") for level in vae.decoder.up] == [False] + [True] * (levels - 1)
    # decoder.up[i] is resolution level i, with that level's channels
    assert [level.block[-1].conv2.out_channels for level in vae.decoder.up] == [
        TINY.base_channels * m for m in TINY.channel_mult
    ]
    assert all(m.eps == 1e-6 for m in vae.modules() if isinstance(m, torch.nn.GroupNorm))
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in vae.modules())


def test_downsample_pads_right_and_bottom_only_and_upsample_is_nearest():
    torch.manual_seed(0)
    down, up = Downsample(4), Upsample(4)
    x = _latent(1, 4, (6, 6), seed=2)
    with torch.no_grad():
        assert torch.equal(down(x), F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2))
        assert down(x).shape[-2:] == (3, 3)
        nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        assert torch.equal(up(x), up.conv(nearest))


def test_a_latent_bound_squashes_the_encoder_output():
    bounded = make_vae(replace(TINY, latent_bound=0.1))
    with torch.no_grad():
        latent = bounded.encode_latent(_images(1, (8, 8)) * 50)
    assert latent.abs().max() <= 0.1
    assert make_vae(TINY).encoder.latent_bound is None  # official: unbounded


# ---- to_uint8 ---------------------------------------------------------------------------------
def test_to_uint8_is_rgb_channels_last_and_truncates():
    images = torch.tensor([-1.0, 1.0, 0.0, -0.9137, 0.99]).view(1, 1, 1, 5).expand(1, 3, 1, 5).clone()
    images[0, 1], images[0, 2] = 1.0, -1.0  # green all 255, blue all 0
    out = to_uint8(images)
    assert out.shape == (1, 1, 5, 3) and out.dtype == torch.uint8
    # (x + 1) / 2 * 255 cast toward zero: 0 -> 127.5 -> 127; -0.9137 -> 11.00... -> 11 and 0.99 -> 253.7 -> 253
    assert out[0, 0, :, 0].tolist() == [0, 255, 127, 11, 253]
    assert out[0, 0, :, 1].tolist() == [255] * 5 and out[0, 0, :, 2].tolist() == [0] * 5  # RGB: no BGR flip


def test_to_uint8_maps_the_decoder_range_onto_every_level_in_order():
    ramp = torch.linspace(-1, 1, 4097).view(1, 1, 1, -1).expand(1, 3, 1, -1)
    levels = to_uint8(ramp)[0, 0, :, 0].long()
    assert levels[0] == 0 and levels[-1] == 255
    assert bool((levels[1:] >= levels[:-1]).all()) and levels.unique().numel() == 256


# ---- bits round trip --------------------------------------------------------------------------
def test_encode_quantize_decode_round_trip(vae):
    images = _images(2, (16, 16), seed=3)
    scales = SCHEDULE.vae_scales(False)
    with torch.no_grad():
        encoded = vae.encode_bits(images, scales)
        assert isinstance(encoded, EncodedBits)
        assert [tuple(b.shape) for b in encoded.bits] == [(2, h, w, TINY.bits) for h, w in scales]
        assert all(set(b.unique().tolist()) <= {0, 1} for b in encoded.bits)
        assert encoded.quantized.shape == (2, TINY.bits, 4, 4)
        rebuilt = vae.reconstruct(images, scales)
        torch.testing.assert_close(rebuilt, vae.decode(encoded.quantized), atol=1e-6, rtol=0)
    assert rebuilt.shape == images.shape


def test_the_patchify_variant_makes_4x_bits_tokens_on_a_2x_latent(patchify_vae):
    config = PATCHIFY
    assert config.spatial_patchify and config.token_bits == 4 * config.bits
    assert config.pixels_per_token == 2 * config.stride
    scales = SCHEDULE.vae_scales(True)  # latent grids: 2x the token grids
    assert scales[-1] == (8, 8)
    H, W = SCHEDULE.image_size(config.pixels_per_token)
    images = _images(1, (H, W), seed=4)
    quant = patchify_vae.quantizer
    with torch.no_grad():
        encoded = patchify_vae.encode_bits(images, scales)
        assert encoded.quantized.shape == (1, config.bits, 8, 8)
        tokens = quant.to_token_layout(encoded.quantized)
        assert tokens.shape == (1, 4 * 4, config.token_bits)  # the transformer's final scale
        assert patchify_vae.reconstruct(images, scales).shape == (1, 3, H, W)
