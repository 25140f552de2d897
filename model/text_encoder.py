"""T5 text encoder: any directory `transformers` can load (flan-t5-xl for the official models).

Tokenised as the official code does (truncate at 512 tokens, EOS appended, pad id 0); only the
true tokens are kept, so the padded length does not matter (the padding is masked).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from model.attention import TextMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedText:
    memory: TextMemory  # features (B, T, Ct) float32, lengths (B,)
    token_counts: list[int]  # true tokens per prompt, EOS included


class FeatureCache:
    """LRU of prompt -> features, bounded in bytes. Exact: a prompt is always encoded alone, so its
    features do not depend on what it was encoded with; repeated prompts and `n > 1` skip T5."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: str) -> torch.Tensor | None:
        with self._lock:
            features = self._entries.get(prompt)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(prompt)
            self.hits += 1
            return features

    def put(self, prompt: str, features: torch.Tensor) -> None:
        size = _entry_bytes(prompt, features)
        if size > self.max_bytes:
            return
        with self._lock:
            if prompt in self._entries:
                return
            self._entries[prompt] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                evicted = self._entries.popitem(last=False)
                self.bytes -= _entry_bytes(*evicted)


def _entry_bytes(prompt: str, features: torch.Tensor) -> int:
    """What one entry holds. The key counts too: a long prompt can outweigh its features (T5 truncates
    at 512 tokens, the string does not), so counting tensors alone would let long prompts pass the bound.
    sys.getsizeof, not the UTF-8 length: it is what the str occupies in this process."""
    return sys.getsizeof(prompt) + features.numel() * features.element_size()


class T5TextEncoder:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: T5EncoderModel,
        max_length: int = 512,
        cache_bytes: int = 64 * 2**20,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.cache = FeatureCache(cache_bytes)

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        max_length: int = 512,
        cache_bytes: int = 64 * 2**20,
    ) -> T5TextEncoder:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        device = torch.device(device)
        dtype = dtype or cls.default_dtype(device)
        tokenizer = AutoTokenizer.from_pretrained(path, legacy=True)
        # ignore: transformers wraps `to` in functools.wraps(nn.Module.to), whose stub drops the bound self
        model = T5EncoderModel.from_pretrained(path, dtype=dtype).to(device)  # type: ignore[arg-type]
        log.info("text encoder %s: d_model=%d, %s on %s", path, model.config.d_model, dtype, device)
        return cls(tokenizer, model, max_length, cache_bytes)

    @staticmethod
    def default_dtype(device: torch.device | str) -> torch.dtype:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32

    @property
    def channels(self) -> int:
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> EncodedText:
        """Each distinct prompt is encoded alone: padding changes T5's floats slightly, and a prompt
        must give the same features (hence the same image) whatever else shares its batch."""
        encoded = {p: self._cached(p) for p in dict.fromkeys(prompts)}
        T = max(f.shape[0] for f in encoded.values())
        features = torch.zeros(len(prompts), T, self.channels, device=self.device)
        for i, p in enumerate(prompts):
            features[i, : encoded[p].shape[0]] = encoded[p]
        lengths = torch.tensor([encoded[p].shape[0] for p in prompts], device=self.device)
        return EncodedText(TextMemory(features, lengths), lengths.tolist())

    def _cached(self, prompt: str) -> torch.Tensor:
        features = self.cache.get(prompt)
        if features is None:
            features = self._encode_one(prompt)
            self.cache.put(prompt, features)
        return features

    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(L, Ct) float32 features of one prompt, EOS included, no padding."""
        ids = self.tokenizer(prompt, max_length=self.max_length, truncation=True, return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()
