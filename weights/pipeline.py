"""Build a ready pipeline from files: transformer, VAE and T5 directory."""

from __future__ import annotations

from pathlib import Path

from model.config import RuntimeConfig
from model.pipeline import DTYPES, InfinityPipeline
from weights.loader import load_transformer, load_vae
from weights.preview import load_preview_decoder
from weights.text_encoders import TextEncoders


def load_pipeline(
    transformer: str | Path,
    vae: str | Path,
    text_encoder: str | Path,
    runtime: RuntimeConfig = RuntimeConfig(),
    preview_decoder: str | Path | None = None,
    text_encoders: TextEncoders | None = None,
) -> InfinityPipeline:
    """preview_decoder: a trained preview decoder's file (weights/preview.py), read unless previews are
    "decoder"; without one, "fast" previews use a linear map fitted from the VAE decoder and "auto" the
    real decoder. text_encoders: where pipelines that name the same T5 folder share one (None: its own)."""
    model = load_transformer(transformer)
    bitwise_vae = load_vae(vae, token_bits=model.config.token_bits)
    text_dtype = DTYPES[runtime.text_dtype] if runtime.text_dtype else None
    text_encoders = TextEncoders() if text_encoders is None else text_encoders  # an empty one is falsy
    encoder = text_encoders.get(text_encoder, runtime.device, text_dtype, max_length=min(512, model.config.text_maxlen))
    previews = None
    if preview_decoder is not None and runtime.preview != "decoder":
        previews = load_preview_decoder(preview_decoder, bitwise_vae.config)
    return InfinityPipeline(model, bitwise_vae, encoder, runtime, previews)
