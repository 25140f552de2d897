"""model/fast_decoder.py: the folded upsampling equals upsample-then-convolve, and the fast decode gives
the reference decoder's pixels (within a fraction of a level) on every VAE layout, in float32 and bf16."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from model.config import VAE_SIZES, VAEConfig
from model.fast_decoder import FoldedUpsample
from model.vae import BitwiseVAE, Upsample, to_uint8
from tests.conftest import make_vae

# The d32 layout (5 levels, 4 upsamplings, 3 blocks per level) at a quarter of its width.
D32_NARROW = replace(VAE_SIZES["d32"], base_channels=32)
LAYOUTS = {"tiny": VAE_SIZES["tiny"], "tiny-patchify": VAE_SIZES["tiny-patchify"], "d32-narrow": D32_NARROW}


def _latent(config: VAEConfig, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    # Codes of the quantizer's magnitude (+-1/sqrt(d) per bit, summed over a few scales).
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, config.bits, *size, generator=g) * 2 / config.bits**0.5


def _pair(config: VAEConfig) -> tuple[BitwiseVAE, BitwiseVAE]:
    reference = make_vae(config)
    fast = copy.deepcopy(reference)
    fast.use_fast_decoder()
    return reference, fast


@pytest.mark.parametrize("channels", [8, 24])
def test_a_folded_upsampling_is_nearest_upsampling_then_the_convolution(channels):
    torch.manual_seed(channels)
    upsample = Upsample(channels)
    with torch.no_grad():
        upsample.conv.bias.normal_()
    x = torch.randn(2, channels, 5, 7)  # odd, non-square: every border phase
    with torch.inference_mode():
        want, got = upsample(x), FoldedUpsample(upsample)(x)
    assert got.shape == want.shape == (2, channels, 10, 14)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_decode_gives_the_reference_pixels(layout):
    """Float rounding only: measured max |diff| ~1e-4 of the [-1, 1] range (a few hundredths of a
    level); a wrong fold or a skipped block moves pixels by tens of levels."""
    config = LAYOUTS[layout]
    reference, fast = _pair(config)
    for seed, size in enumerate([(4, 4), (3, 5)]):
        z = _latent(config, size, seed)
        with torch.inference_mode():
            want, got = reference.decode(z), fast.decode(z)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 2e-3, (got - want).abs().max()
        levels = np.abs(to_uint8(got).numpy().astype(int) - to_uint8(want).numpy().astype(int))
        assert levels.max() <= 1, levels.max()


def test_fast_decode_in_bfloat16_stays_near_the_bfloat16_reference():
    reference, fast = make_vae(D32_NARROW), make_vae(D32_NARROW)
    for vae in (reference, fast):
        vae.decoder.to(torch.bfloat16)
    fast.use_fast_decoder()
    z = _latent(D32_NARROW, (4, 4))
    with torch.inference_mode():
        want, got = reference.decode(z), fast.decode(z)
    assert got.dtype == torch.float32
    assert (got - want).abs().mean() < 0.02, (got - want).abs().mean()  # bf16 rounding, not a wrong graph


def test_the_fast_decoder_adds_no_state_dict_keys_and_keeps_training_untouched():
    vae = make_vae(VAE_SIZES["tiny"])
    keys = {k: v.shape for k, v in vae.state_dict().items()}
    vae.use_fast_decoder()
    assert {k: v.shape for k, v in vae.state_dict().items()} == keys
    assert not any(isinstance(m, FoldedUpsample) for m in vae.modules())  # not in the module tree
    assert isinstance(vae.decoder.up[1].upsample, nn.Module)  # the official modules stay
