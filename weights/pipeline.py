"""Build a ready pipeline from files: transformer, VAE and T5 directory."""

from __future__ import annotations

from pathlib import Path

from model.config import RuntimeConfig
from model.pipeline import DTYPES, InfinityPipeline
from model.text_encoder import T5TextEncoder
from weights.loader import load_transformer, load_vae


def load_pipeline(
    transformer: str | Path, vae: str | Path, text_encoder: str | Path, runtime: RuntimeConfig = RuntimeConfig()
) -> InfinityPipeline:
    model = load_transformer(transformer)
    bitwise_vae = load_vae(vae, token_bits=model.config.token_bits)
    text_dtype = DTYPES[runtime.text_dtype] if runtime.text_dtype else None
    encoder = T5TextEncoder.from_dir(
        text_encoder, runtime.device, text_dtype, max_length=min(512, model.config.text_maxlen)
    )
    return InfinityPipeline(model, bitwise_vae, encoder, runtime)
