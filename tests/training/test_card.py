"""The model card states which targets the scores meet, never more."""

from training.card import TARGETS, limits_paragraph
from training.evaluate import EvalReport


def test_the_card_says_which_targets_are_met():
    low = EvalReport({"single colour": 0.96, "single": 0.5, "two": 0.1, "overall": 0.3}, 50)
    text = limits_paragraph(low, "training templates")
    assert "not all met" in text and "single colour 0.96 (target 0.95, met)" in text
    assert "two 0.10 (target 0.50, not met)" in text
    high = EvalReport({name: bar for name, bar in TARGETS.items()}, 50)
    assert limits_paragraph(high, "held-out templates").startswith("All targets are met")


def test_the_score_table_shows_the_vae_ceiling_beside_the_model():
    model = EvalReport({"single": 0.5, "overall": 0.3}, 8)
    ceiling = EvalReport({"single": 0.9, "overall": 0.7}, 8)
    assert "| single | 0.500 | 0.900 |" in model.table(ceiling)
    assert "VAE ceiling" not in model.table()
