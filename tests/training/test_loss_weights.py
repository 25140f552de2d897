"""The transformer's per-token loss weights (uniform vs the official reweight_loss_by_scale)."""

import pytest
import torch

from training.recipe import SCHEDULE
from training.transformer_training import token_weights


def _per_scale(weights: torch.Tensor, scales) -> list[float]:
    sizes = [h * w for h, w in scales]
    return [chunk.sum().item() for chunk in weights.split(sizes)]


def test_uniform_weights_every_token_alike():
    weights = token_weights(SCHEDULE.scales, "uniform")
    assert weights.shape == (sum(h * w for h, w in SCHEDULE.scales),)
    assert torch.allclose(weights, torch.full_like(weights, 1 / len(weights)))


def test_sqrt_area_weights_each_scale_by_its_side():
    scales = ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8))
    weights = token_weights(scales, "sqrt_area")
    assert weights.sum().item() == pytest.approx(1.0)
    sides = torch.tensor([1.0, 2, 3, 4, 6, 8])
    assert _per_scale(weights, scales) == pytest.approx((sides / sides.sum()).tolist())
    # Non-square scales too: a 2x3 scale weighs sqrt(6) in all.
    mixed = token_weights(((1, 1), (2, 3)), "sqrt_area")
    assert _per_scale(mixed, ((1, 1), (2, 3))) == pytest.approx([1 / (1 + 6**0.5), 6**0.5 / (1 + 6**0.5)])


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="scale_weighting"):
        token_weights(SCHEDULE.scales, "linear")
