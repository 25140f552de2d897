"""Build models on the meta device and load checkpoints into them, strictly.

Before anything is assigned, the checkpoint's names are mapped (weights/keymap.py) and compared
with the model: one CheckpointError names every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from model.config import TransformerConfig, VAEConfig
from model.transformer import Infinity
from model.vae import BitwiseVAE
from weights.infer import infer_transformer_config, infer_vae_config
from weights.io import CheckpointError, StateDict, read_metadata, read_state_dict
from weights.keymap import TRANSFORMER_DROPPED, TRANSFORMER_IGNORED, VAE_DROPPED, is_dropped, transformer_name, vae_name

log = logging.getLogger(__name__)
_LIST_LIMIT = 50


def shapes_of(state: StateDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def check_keys(expected: dict[str, tuple[int, ...]], provided: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    missing = sorted(set(expected) - set(provided))
    unexpected = sorted(set(provided) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(provided) if tuple(expected[k]) != tuple(provided[k]))
    if not (missing or unexpected or mismatched):
        return

    def listing(title: str, keys: list[str], fmt) -> str:
        shown = "\n".join(f"    {fmt(k)}" for k in keys[:_LIST_LIMIT])
        more = f"\n    ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else ""
        return f"  {title} ({len(keys)}):\n{shown}{more}"

    parts = []
    if missing:
        parts.append(listing("missing", missing, lambda k: f"{k} {list(expected[k])}"))
    if unexpected:
        parts.append(listing("unexpected", unexpected, lambda k: f"{k} {list(provided[k])}"))
    if mismatched:
        parts.append(
            listing(
                "mis-shaped", mismatched, lambda k: f"{k}: checkpoint {list(provided[k])}, model {list(expected[k])}"
            )
        )
    raise CheckpointError(f"{source} does not fit the model:\n" + "\n".join(parts))


def _drop_constant(state: StateDict, patterns, source: str) -> StateDict:
    out = {}
    for name, tensor in state.items():
        if not is_dropped(name, patterns):
            out[name] = tensor
        elif name.endswith("zero_k_bias") and not tensor.is_meta and torch.count_nonzero(tensor):
            raise CheckpointError(f"{source}: buffer {name} must be all zeros (the K projection has no bias)")
    return out


def map_transformer_state(state: StateDict, blocks_per_chunk: int, source: str = "checkpoint") -> StateDict:
    """Official (or our) names -> our names; constant buffers checked and dropped."""
    state = {k: v for k, v in state.items() if k not in TRANSFORMER_IGNORED}
    state = _drop_constant(state, TRANSFORMER_DROPPED, source)
    return {transformer_name(k, blocks_per_chunk): v for k, v in state.items()}


def map_vae_state(state: StateDict, ours: set[str], source: str = "checkpoint") -> StateDict:
    state = _drop_constant(state, VAE_DROPPED, source)
    mapped: StateDict = {}
    for k, v in state.items():
        name = vae_name(k, ours)
        if name in mapped:
            raise CheckpointError(f"{source}: {k} and another key both map to {name}")
        mapped[name] = v
    return mapped


def _assign(module: nn.Module, state: StateDict, source: str) -> None:
    check_keys(shapes_of(module.state_dict()), shapes_of(state), source)
    module.load_state_dict(state, strict=True, assign=True)
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters()):
        module.float()  # half-precision files: compute dtypes are chosen by the pipeline


def build_transformer(
    config: TransformerConfig, state: StateDict | None = None, source: str = "checkpoint"
) -> Infinity:
    """An Infinity model: random init if `state` is None, else built on meta and assigned."""
    if state is None:
        return Infinity(config)
    with torch.device("meta"):
        model = Infinity(config)
    _assign(model, map_transformer_state(state, config.blocks_per_chunk, source), source)
    return model


def build_vae(config: VAEConfig, state: StateDict | None = None, source: str = "checkpoint") -> BitwiseVAE:
    if state is None:
        return BitwiseVAE(config)
    with torch.device("meta"):
        vae = BitwiseVAE(config)
    _assign(vae, map_vae_state(state, set(vae.state_dict()), source), source)
    return vae


def load_transformer(path: str | Path) -> Infinity:
    """Official .pth, sharded folder or our safetensors; the architecture comes from the shapes."""
    state = read_state_dict(path)
    config = infer_transformer_config(shapes_of(state))
    log.info(
        "transformer %s: depth %d, width %d, %d heads, %d bits/token, %.2fB params",
        path,
        config.depth,
        config.width,
        config.num_heads,
        config.token_bits,
        config.num_params / 1e9,
    )
    return build_transformer(config, state, str(path))


def load_vae(path: str | Path, token_bits: int | None = None) -> BitwiseVAE:
    """Official VAE .pth (weights under "vae") or our safetensors."""
    path = Path(path)
    state = read_state_dict(path, nested_key="vae")
    extra = json.loads(read_metadata(path).get("vae_config", "{}"))
    config = infer_vae_config(
        shapes_of(state),
        token_bits,
        code_decay=float(extra.get("code_decay", 1.0)),
        norm_groups=int(extra.get("norm_groups", 32)),
        latent_bound=extra.get("latent_bound"),
    )
    log.info(
        "VAE %s: %d bits, stride %d, channels %dx%s, patchify=%s",
        path,
        config.bits,
        config.stride,
        config.base_channels,
        list(config.channel_mult),
        config.spatial_patchify,
    )
    return build_vae(config, state, str(path))


def vae_metadata(config: VAEConfig) -> dict[str, str]:
    """Safetensors metadata for the fields that shapes cannot tell."""
    fields = {k: v for k, v in asdict(config).items() if k in ("code_decay", "norm_groups", "latent_bound")}
    return {"vae_config": json.dumps(fields)}
