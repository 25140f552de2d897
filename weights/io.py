"""Reading checkpoint files: official .pth, sharded folders and safetensors.

Pickles are opened with `weights_only=True` (a file that would run code on load is refused)
and `mmap=True` (a 2B checkpoint is not copied into memory before it is needed).
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why and names every bad key."""


def read_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata (empty for other formats)."""
    if path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    return {}


def read_state_dict(path: str | Path, nested_key: str | None = None) -> StateDict:
    """All tensors of a checkpoint file or sharded folder, on the CPU.

    nested_key: where an official file keeps its weights (the VAE files use "vae").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_folder(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _unwrap(_read_pickle(path), path, nested_key)


def _read_safetensors(path: Path) -> StateDict:
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain containers, "
            f"which could execute code (weights_only=True). Re-save it as a plain state dict. ({e})".splitlines()[0]
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or wrong file?): {e}") from None


def _unwrap(obj: object, path: Path, nested_key: str | None) -> StateDict:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    state: dict = obj
    if nested_key is not None and isinstance(state.get(nested_key), dict):
        state = state[nested_key]
    elif isinstance(state.get("trainer"), dict) and isinstance(state["trainer"].get("gpt_fsdp"), dict):
        state = state["trainer"]["gpt_fsdp"]  # full official training checkpoint
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    others = sorted(k for k in state if k not in tensors)
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {others[:10]})")
    if others:
        log.warning("%s: ignoring %d non-tensor entries: %s", path, len(others), others[:10])
    return tensors


def _read_folder(path: Path) -> StateDict:
    """A sharded checkpoint: `*.index.json` with a weight_map, or every shard file in the folder."""
    indexes = sorted(path.glob("*.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    if not shards:
        raise CheckpointError(f"{path}: folder holds no index.json and no shard files")
    out: StateDict = {}
    for name in shards:
        shard = _shard_path(path, name)
        if not shard.exists():
            raise CheckpointError(f"{path}: shard {name} listed in the index is missing")
        part = _read_safetensors(shard) if shard.suffix == ".safetensors" else _unwrap(_read_pickle(shard), shard, None)
        duplicated = sorted(set(part) & set(out))
        if duplicated:
            raise CheckpointError(f"{path}: keys appear in several shards: {duplicated[:10]}")
        out.update(part)
    log.info("read %d tensors from %d shards in %s", len(out), len(shards), path)
    return out


def _shard_path(folder: Path, name: object) -> Path:
    """Where a shard named by an index lives: a relative path that stays inside the folder.

    Checked on the name, not on the resolved path: a Hugging Face cache snapshot keeps its shards as
    symlinks into a sibling `blobs/` folder, which is legitimate; an index naming "../x" is not.
    """
    relative = Path(name) if isinstance(name, str) else None
    if relative is None or not relative.parts or relative.is_absolute() or ".." in relative.parts:
        raise CheckpointError(f"{folder}: the index names shard {name!r}, which is not a file inside the folder")
    return folder / relative
