"""The text-feature cache: exact, counted, bounded in bytes."""

from __future__ import annotations

import torch

from model.text_encoder import T5TextEncoder


def test_repeated_prompts_reuse_exact_features_and_the_cache_stays_bounded(t5_dir):
    cached = T5TextEncoder.from_dir(t5_dir)
    fresh = T5TextEncoder.from_dir(t5_dir, cache_bytes=0)
    first = cached.encode(["a red circle", "a red circle", "a blue square"])
    assert (cached.cache.hits, cached.cache.misses) == (0, 2)          # n > 1 of one prompt: encoded once
    again = cached.encode(["a blue square", "a red circle"])
    assert (cached.cache.hits, cached.cache.misses) == (2, 2)
    reference = fresh.encode(["a blue square", "a red circle"])
    assert torch.equal(again.memory.features, reference.memory.features)
    assert torch.equal(first.memory.features[2], reference.memory.features[0])
    assert fresh.cache.bytes == 0 and fresh.cache.hits == 0

    one = cached.cache.bytes // 2                                       # room for about one entry
    small = T5TextEncoder.from_dir(t5_dir, cache_bytes=one + 1)
    small.encode(["a red circle"])
    small.encode(["a blue square"])
    assert small.cache.bytes <= one + 1 and len(small.cache) == 1
