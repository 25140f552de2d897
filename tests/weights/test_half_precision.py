"""Official-layout checkpoints stored in float16 or bfloat16 (as released weights often are): they load
as exactly the float32 weights cast to that dtype (computed in float32 from there), and generate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model.config import SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.text_encoder import T5TextEncoder
from weights import load_transformer, load_vae
from weights.io import StateDict
from weights.official import official_transformer_state, official_vae_state


def cast(state: StateDict, dtype: torch.dtype) -> StateDict:
    """Floating tensors to `dtype`; integer buffers (the VAE's bit masks) stay as they are."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def through(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A float32 copy whose floating parameters and buffers went through `dtype` and back."""
    rounded = copy.deepcopy(module)
    with torch.no_grad():
        for t in [*rounded.parameters(), *rounded.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return rounded


def assert_same_state(loaded: torch.nn.Module, expected: torch.nn.Module) -> None:
    got, want = loaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_official_checkpoints_load_as_the_cast_weights_and_generate(
    tmp_path, t5_dir, tiny_transformer, tiny_vae, dtype
):
    transformer_file, vae_file = tmp_path / "infinity_tiny.pth", tmp_path / "infinity_vae_tiny.pth"
    torch.save(cast(official_transformer_state(tiny_transformer), dtype), transformer_file)
    torch.save({"vae": cast(official_vae_state(tiny_vae), dtype)}, vae_file)
    assert torch.load(transformer_file, weights_only=True)["head.weight"].dtype == dtype  # really stored so

    transformer = load_transformer(transformer_file)
    vae = load_vae(vae_file, token_bits=transformer.config.token_bits)
    assert transformer.config == tiny_transformer.config and vae.config == tiny_vae.config
    expected_transformer, expected_vae = through(tiny_transformer, dtype), through(tiny_vae, dtype)
    assert_same_state(transformer, expected_transformer)
    assert_same_state(vae, expected_vae)

    schedule, params = ScaleSchedule.official(1.0, "0.06M"), SamplingParams(seed=3)
    text = T5TextEncoder.from_dir(t5_dir)
    got = InfinityPipeline(transformer, vae, text).generate(["a red circle"], schedule, params)
    want = InfinityPipeline(expected_transformer, expected_vae, text).generate(["a red circle"], schedule, params)
    assert got.images[0].shape == (64, 64, 3) and got.images[0].dtype == np.uint8
    assert np.array_equal(got.images[0], want.images[0])
