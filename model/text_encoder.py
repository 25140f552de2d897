"""T5 text encoder: any directory `transformers` can load (flan-t5-xl for the official models).

Tokenised as the official code does (truncate at 512 tokens, EOS appended, pad id 0); only the
true tokens are kept, so the padded length does not matter (the padding is masked).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from model.attention import TextMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedText:
    memory: TextMemory              # features (B, T, Ct) float32, lengths (B,)
    token_counts: list[int]         # true tokens per prompt, EOS included


class T5TextEncoder:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: T5EncoderModel, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length

    @classmethod
    def from_dir(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 max_length: int = 512) -> "T5TextEncoder":
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        device = torch.device(device)
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(path, legacy=True)
        model = T5EncoderModel.from_pretrained(path, dtype=dtype).to(device)
        log.info("text encoder %s: d_model=%d, %s on %s", path, model.config.d_model, dtype, device)
        return cls(tokenizer, model, max_length)

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
        unique = list(dict.fromkeys(prompts))
        encoded = {p: self._encode_one(p) for p in unique}
        T = max(f.shape[0] for f in encoded.values())
        features = torch.zeros(len(prompts), T, self.channels, device=self.device)
        for i, p in enumerate(prompts):
            features[i, : encoded[p].shape[0]] = encoded[p]
        lengths = torch.tensor([encoded[p].shape[0] for p in prompts], device=self.device)
        return EncodedText(TextMemory(features, lengths), lengths.tolist())

    def _encode_one(self, prompt: str) -> torch.Tensor:
        """(L, Ct) float32 features of one prompt, EOS included, no padding."""
        ids = self.tokenizer(prompt, max_length=self.max_length, truncation=True, return_tensors="pt")["input_ids"]
        ids = ids.to(self.device)
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0].float()
