"""The benchmark's FLOP count agrees with torch's FlopCounterMode on a real sampling run."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model.attention import TextMemory
from model.config import TRANSFORMER_SIZES, SamplingParams
from model.quantizer import BitwiseQuantizer
from model.sampler import sample
from model.schedules import ScaleSchedule
from model.transformer import Infinity
from tests.bench.flops import image_flops
from tests.bench.model_bench import VAE_FOR_BITS


@pytest.mark.parametrize("guided_scales", [None, 4])  # 4: cfg 1 on the last 3 of 7 scales
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_counted_flops_match_the_measured_ones(size, guided_scales):
    config = TRANSFORMER_SIZES[size]
    model = Infinity(config).eval()
    schedule, batch, text_tokens = ScaleSchedule.official(1.0, "0.06M"), 3, 7
    text = TextMemory(torch.randn(batch, text_tokens, config.text_channels), torch.full((batch,), text_tokens))
    n = schedule.num_scales
    cfg = 3.0 if guided_scales is None else (3.0,) * guided_scales + (1.0,) * (n - guided_scales)
    params = [SamplingParams(cfg=cfg, tau=1.0, seed=i) for i in range(batch)]
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    # The math attention backend decomposes into matmuls, which the counter sees.
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        sample(
            model,
            BitwiseQuantizer(VAE_FOR_BITS[config.token_bits]),
            schedule,
            text,
            model.unconditional_text(text.lengths),
            params,
            generators,
            "sdpa",
        )
    counted = batch * image_flops(config, schedule, text_tokens, guided_scales=guided_scales)
    assert counted == pytest.approx(counter.get_total_flops(), rel=0.01)
