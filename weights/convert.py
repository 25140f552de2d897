"""`infinity-serve convert`: any supported checkpoint -> one safetensors file with our names."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from safetensors.torch import save_file
from torch import nn

from weights.loader import load_transformer, load_vae, vae_metadata

log = logging.getLogger(__name__)


def convert(
    src: str | Path, dst: str | Path, kind: Literal["transformer", "vae"], token_bits: int | None = None
) -> Path:
    """Load strictly (every key checked), then write contiguous tensors with our names."""
    dst = Path(dst)
    model: nn.Module
    if kind == "transformer":
        model, metadata = load_transformer(src), {"kind": "transformer"}
    else:
        vae = load_vae(src, token_bits)
        model, metadata = vae, {"kind": "vae", **vae_metadata(vae.config)}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata={"format": "infinity-serve", **metadata})
    log.info("wrote %d tensors to %s", len(tensors), dst)
    return dst
