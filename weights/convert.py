"""`infinity-serve convert`: any supported checkpoint -> one safetensors file with our names."""

from __future__ import annotations

import logging
import os
import stat
import uuid
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
    honour_umask(dst)
    log.info("wrote %d tensors to %s", len(tensors), dst)
    return dst


def honour_umask(path: Path) -> None:
    """Give `path` the mode a new file gets here (0o666 less the umask), as other tools' files have.

    safetensors creates its files 0600: a weights volume prepared by one user (say root) would be
    unreadable by the serving user (the container's non-root user). The umask is read from a probe
    file, not with os.umask, which sets it process-wide for a moment (not thread-safe).
    """
    probe = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.probe")
    probe.touch()
    try:
        os.chmod(path, stat.S_IMODE(probe.stat().st_mode))
    finally:
        probe.unlink()
