"""One loaded text encoder per (folder, device, dtype, length): models that name the same T5 share it.

flan-t5-xl is 4.9 GB in float32 (2.4 GB in float16); a server with the 2B and the 8B on one GPU would
otherwise hold it twice. Sharing is exact: an encoder's features depend only on the prompt (each prompt
is encoded alone, model/text_encoder.py), so a shared feature cache only adds hits.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from model.text_encoder import T5TextEncoder

Key = tuple[Path, str, torch.dtype, int]


class TextEncoders:
    """The encoders loaded so far, keyed by what makes two of them identical."""

    def __init__(self) -> None:
        self._loaded: dict[Key, T5TextEncoder] = {}
        self._lock = threading.Lock()  # models may load on several threads

    def __len__(self) -> int:
        return len(self._loaded)

    def get(
        self, folder: str | Path, device: torch.device | str, dtype: torch.dtype | None, max_length: int
    ) -> T5TextEncoder:
        # resolve(): "weights/t5" and "./weights/../weights/t5" are one folder; str(device): "cuda" vs
        # "cuda:0" stay distinct, as Settings names devices explicitly.
        dtype = dtype or T5TextEncoder.default_dtype(device)
        key = (Path(folder).resolve(), str(torch.device(device)), dtype, max_length)
        with self._lock:
            encoder = self._loaded.get(key)
            if encoder is None:
                encoder = T5TextEncoder.from_dir(folder, device, dtype, max_length=max_length)
                self._loaded[key] = encoder
            return encoder
