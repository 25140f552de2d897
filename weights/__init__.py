"""Checkpoints: reading, key mapping, architecture inference, strict loading, conversion."""

from weights.io import CheckpointError, read_state_dict
from weights.loader import build_transformer, build_vae, load_transformer, load_vae
from weights.pipeline import load_pipeline

__all__ = [
    "CheckpointError",
    "build_transformer",
    "build_vae",
    "load_pipeline",
    "load_transformer",
    "load_vae",
    "read_state_dict",
]
