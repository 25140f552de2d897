"""The preview decoder's file (model/preview.py): half-precision safetensors, its config in the metadata.

Loaded strictly, like the other weights: one CheckpointError names every missing, unexpected and
mis-shaped key, and a decoder made for another VAE (bits or stride) is refused by name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import VAEConfig
from model.preview import PreviewDecoder, PreviewDecoderConfig
from weights.io import CheckpointError, read_metadata, read_state_dict
from weights.loader import check_keys, shapes_of

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview_decoder.safetensors"  # its name in a model directory


def save_preview_decoder(decoder: PreviewDecoder, path: Path) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in decoder.state_dict().items()}
    config = json.dumps(asdict(decoder.config))
    save_file(state, str(path), metadata={"format": "infinity-serve", "preview_decoder": config})


def load_preview_decoder(path: str | Path, vae: VAEConfig) -> PreviewDecoder:
    """A float32 PreviewDecoder for `vae`'s latents, from a file written by save_preview_decoder."""
    path = Path(path)
    state = read_state_dict(path)
    fields = read_metadata(path).get("preview_decoder")
    if fields is None:
        raise CheckpointError(f"{path}: no `preview_decoder` config in its metadata")
    config = PreviewDecoderConfig(**json.loads(fields))
    if (config.bits, config.stride) != (vae.bits, vae.stride):
        raise CheckpointError(
            f"{path}: made for {config.bits}-bit latents at stride {config.stride}, "
            f"the VAE has {vae.bits} bits at stride {vae.stride}"
        )
    decoder = PreviewDecoder(config)
    check_keys(shapes_of(decoder.state_dict()), shapes_of(state), str(path))
    decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    log.info("preview decoder %s: width %d, %d blocks", path, config.width, config.blocks)
    return decoder.eval().requires_grad_(False)
