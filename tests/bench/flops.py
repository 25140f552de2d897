"""FLOPs of Infinity sampling, counted from the architecture (a multiply-add = 2 FLOPs).

Counts the matrix multiplies and attention products, which are >99% of the work at real sizes;
elementwise work (norms, RoPE, sampling) is left out, as model-FLOP-utilisation counts do.
Checked against torch's own FlopCounterMode in tests/bench/test_flops.py.
"""

from __future__ import annotations

from model.config import TransformerConfig
from model.schedules import ScaleSchedule


def per_request_flops(config: TransformerConfig, text_tokens: int) -> int:
    """One row's conditioning: the text projections and each block's cross-attention K/V."""
    C, Ct, T = config.width, config.text_channels, text_tokens
    text_proj = 2 * T * Ct * C + 2 * T * C * C  # text_proj_for_ca: Ct -> C -> C
    pooling = 2 * T * Ct * 2 * C + 4 * T * C + 2 * C * C  # attentive pooling: kv, products, out
    ada = 2 * C * 6 * C + 2 * C * 2 * C  # shared AdaLN and head modulation
    cross_kv = config.depth * 2 * T * C * 2 * C
    return text_proj + pooling + ada + cross_kv


def per_scale_flops(config: TransformerConfig, tokens: int, visible: int, text_tokens: int) -> int:
    """One row, one scale: `tokens` new tokens attending to `visible` cached ones (itself included)."""
    C, F, L = config.width, config.ffn_hidden, tokens
    block = (
        2 * L * C * 3 * C  # qkv
        + 4 * L * visible * C  # q k^T and (attention) v
        + 2 * L * C * C  # self-attention out
        + 2 * L * C * C  # cross-attention q
        + 4 * L * text_tokens * C  # cross-attention products
        + 2 * L * C * C  # cross-attention out
        + 4 * L * C * F
    )  # FFN
    embed = 2 * L * config.token_bits * C
    head = 2 * L * C * 2 * config.token_bits
    return config.depth * block + embed + head


def image_flops(
    config: TransformerConfig,
    schedule: ScaleSchedule,
    text_tokens: int,
    guided: bool = True,
    guided_scales: int | None = None,
) -> int:
    """FLOPs to sample one image: with classifier-free guidance two rows (conditional and unconditional)
    on the first `guided_scales` scales (default: all), one row after (the sampler drops the
    unconditional rows once cfg is 1 for the rest)."""
    two_rows = (schedule.num_scales if guided_scales is None else guided_scales) if guided else 0
    total = per_request_flops(config, text_tokens) * (2 if guided else 1)
    for k, (start, length) in enumerate(zip(schedule.offsets, schedule.lengths, strict=True)):
        total += per_scale_flops(config, length, start + length, text_tokens) * (2 if k < two_rows else 1)
    return total
