"""Build a small T5 encoder directory offline: a word-level tokenizer made with `tokenizers`
and a randomly initialised `T5EncoderModel`. Used by the tests and by the embedded default
model, whose captions have a small closed vocabulary.

The tokenizer behaves like T5's for our purposes: lower-cased words, `</s>` appended, pad id 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

SPECIAL = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )


def build_t5_encoder_dir(
    path: str | Path,
    words: Iterable[str],
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 64,
    seed: int = 0,
) -> Path:
    """Write a tokenizer + T5 encoder that `T5TextEncoder.from_dir` loads."""
    path = Path(path)
    tokenizer = build_tokenizer(words)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        # not a declared T5Config field in transformers 5 but still accepted, and written to
        # config.json as in the official T5 configs
        decoder_start_token_id=0,
    )  # type: ignore[call-arg]
    with torch.random.fork_rng(devices=[]):  # reproducible init without touching the caller's RNG
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path
