"""torch.compile of the blocks (RuntimeConfig.compile): same bits as eager, one graph for every block."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import torch

from model.config import TRANSFORMER_SIZES, RuntimeConfig, SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.text_encoder import T5TextEncoder
from tests.conftest import make_transformer


def test_compiled_blocks_give_the_eager_bits_without_hitting_the_recompile_limit(t5_dir, tiny_vae, caplog):
    # Deeper than dynamo's recompile limit (8): a block that specialised on its layer index would
    # fall back to eager after the 8th and the warning below would appear.
    config = replace(TRANSFORMER_SIZES["tiny"], depth=10)
    schedule = ScaleSchedule.custom(((1, 1), (2, 2), (4, 4)))
    params = [SamplingParams(cfg=3.0, tau=1.0, seed=s) for s in (1, 2, 3)]
    text = T5TextEncoder.from_dir(t5_dir)
    eager = InfinityPipeline(make_transformer(config), tiny_vae, text)
    compiled = InfinityPipeline(make_transformer(config), tiny_vae, text, RuntimeConfig(compile="default"))
    torch._dynamo.reset()
    dynamo_log = logging.getLogger("torch._dynamo")  # torch's loggers do not propagate to root
    dynamo_log.addHandler(caplog.handler)
    try:
        for batch in (1, 3):  # size 1 is specialised apart from the others
            prompts = ["a red circle", "two blue squares", "a star"][:batch]
            want = eager.generate(prompts, schedule, params[:batch])
            got = compiled.generate(prompts, schedule, params[:batch])
            assert all(np.array_equal(a, b) for a, b in zip(want.bits, got.bits, strict=True))
            assert all(np.array_equal(a, b) for a, b in zip(want.images, got.images, strict=True))
    finally:
        dynamo_log.removeHandler(caplog.handler)
    assert "recompile_limit" not in caplog.text
