"""Infer architectures from tensor shapes, so that any size in the official layout loads.

Works on official or our names and needs only shapes (meta tensors and TSV listings too).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from model.config import TransformerConfig, VAEConfig
from weights.io import CheckpointError
from weights.keymap import TRANSFORMER_BLOCK

Shapes = Mapping[str, tuple[int, ...]]


def _need(shapes: Shapes, name: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[name])
    except KeyError:
        raise CheckpointError(f"cannot infer the architecture: tensor {name!r} is missing") from None


def _block_layout(shapes: Shapes) -> tuple[int, int]:
    """(depth, blocks per chunk) from `block_chunks.{c}.module.{j}` or `blocks.{i}` names."""
    chunked = [TRANSFORMER_BLOCK.match(k) for k in shapes]
    pairs = {(int(m[1]), int(m[2])) for m in chunked if m}
    if pairs:
        per_chunk = max(j for _, j in pairs) + 1
        return len(pairs), per_chunk
    flat = {int(m[1]) for k in shapes if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if not flat:
        raise CheckpointError("cannot infer the architecture: no transformer blocks found")
    return len(flat), len(flat)


def _first_block_prefix(shapes: Shapes) -> str:
    return "block_chunks.0.module.0." if "block_chunks.0.module.0.ada_gss" in shapes else "blocks.0."


def infer_transformer_config(shapes: Shapes) -> TransformerConfig:
    depth, per_chunk = _block_layout(shapes)
    b = _first_block_prefix(shapes)
    width = _need(shapes, "pos_start")[-1]
    text_maxlen, text_channels = _need(shapes, "cfg_uncond")
    return TransformerConfig(
        depth=depth,
        width=width,
        num_heads=_need(shapes, b + "sa.scale_mul_1H11")[1],
        ffn_hidden=_need(shapes, b + "ffn.fc1.weight")[0],
        token_bits=_need(shapes, "word_embed.weight")[1],
        text_channels=text_channels,
        text_maxlen=text_maxlen,
        pool_heads=_need(shapes, "text_proj_for_sos.ca.mat_q")[1],
        num_levels=_need(shapes, "lvl_embed.weight")[0],
        block_chunks=depth // per_chunk,
    )


def _level_count(shapes: Shapes, prefix: str) -> int:
    return len({int(m[1]) for k in shapes if (m := re.match(rf"^{prefix}\.(\d+)\.", k))})


def _conv_weight(shapes: Shapes, name: str) -> tuple[int, ...]:
    """A conv weight under its official wrapped name or our plain name."""
    wrapped = name.replace(".weight", ".conv.weight")
    return tuple(shapes[wrapped]) if wrapped in shapes else _need(shapes, name)


def infer_vae_config(
    shapes: Shapes,
    token_bits: int | None = None,
    code_decay: float = 1.0,
    norm_groups: int = 32,
    latent_bound: float | None = None,
) -> VAEConfig:
    """token_bits: bits per transformer token; 4x the VAE's bits means 2x2 spatial patchify (8B).

    code_decay, norm_groups and latent_bound leave no trace in shapes: official files use the defaults, our
    safetensors carry them in their metadata.
    """
    levels = _level_count(shapes, "decoder.up")
    if levels == 0:
        raise CheckpointError("cannot infer the VAE architecture: no decoder.up.* tensors")
    base = _conv_weight(shapes, "decoder.conv_out.weight")[1]
    mult = tuple(_conv_weight(shapes, f"decoder.up.{i}.block.0.conv1.weight")[0] // base for i in range(levels))
    bits = _conv_weight(shapes, "decoder.conv_in.weight")[1]
    dec_blocks = len({m[1] for k in shapes if (m := re.match(r"^decoder\.up\.0\.block\.(\d+)\.", k))})
    if token_bits is not None and token_bits not in (bits, 4 * bits):
        raise CheckpointError(
            f"VAE has {bits} bits per latent pixel but the transformer's tokens have "
            f"{token_bits}: expected {bits} (no patchify) or {4 * bits} (2x2 patchify)"
        )
    return VAEConfig(
        bits=bits,
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=dec_blocks - 1,
        spatial_patchify=token_bits == 4 * bits,
        code_decay=code_decay,
        norm_groups=norm_groups,
        latent_bound=latent_bound,
    )
