"""Checkpoints: reading, key mapping, architecture inference, strict loading, conversion."""

from weights.io import CheckpointError, read_state_dict
from weights.loader import build_transformer, build_vae, load_transformer, load_vae
from weights.pipeline import load_pipeline

__all__ = ["CheckpointError", "read_state_dict", "build_transformer", "build_vae", "load_transformer",
           "load_vae", "load_pipeline"]
