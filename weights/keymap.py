"""Official checkpoint names -> our parameter names, as data.

Each rule is (regex over the official name, replacement). A name that is already one of ours
maps to itself, so safetensors written by `infinity-serve convert` load through the same path.
`DROPPED` lists official entries that carry no information (constant buffers); the loader
checks their values before discarding them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Transformer: blocks live in chunks officially (`block_chunks.{c}.module.{j}` = block c*k + j).
TRANSFORMER_BLOCK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
TRANSFORMER_DROPPED = (
    re.compile(r"(^|\.)zero_k_bias$"),  # all-zero K bias buffers (K has no bias)
)
# Official buffers that the official loader itself discards if present.
TRANSFORMER_IGNORED = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")

# VAE: the official modules wrap every Conv2d / GroupNorm one level deeper (`conv_in.conv.weight`).
VAE_RULES: tuple[tuple[re.Pattern[str], str], ...] = ((re.compile(r"^(.*)\.(?:conv|norm)\.(weight|bias)$"), r"\1.\2"),)
VAE_DROPPED = (
    re.compile(r"^(quantizer|quantize)\.lfq\.mask$"),  # bit weights 2^(d-1-c): derived, unused for bit labels
)


def transformer_name(official: str, blocks_per_chunk: int) -> str:
    m = TRANSFORMER_BLOCK.match(official)
    if m is None:
        return official
    chunk, index, rest = int(m[1]), int(m[2]), m[3]
    return f"blocks.{chunk * blocks_per_chunk + index}.{rest}"


def official_transformer_name(ours: str, blocks_per_chunk: int) -> str:
    m = re.match(r"^blocks\.(\d+)\.(.+)$", ours)
    if m is None:
        return ours
    i = int(m[1])
    return f"block_chunks.{i // blocks_per_chunk}.module.{i % blocks_per_chunk}.{m[2]}"


def vae_name(official: str, ours: Iterable[str]) -> str:
    """Exact names first (our own files, or the official un-wrapped spelling), then the rules."""
    if official in ours:
        return official
    for pattern, repl in VAE_RULES:
        if pattern.match(official):
            return pattern.sub(repl, official)
    return official


def is_dropped(name: str, patterns: tuple[re.Pattern[str], ...]) -> bool:
    return any(p.search(name) for p in patterns)
