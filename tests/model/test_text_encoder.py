"""The text-feature cache: exact, counted, bounded in bytes."""

from __future__ import annotations

import sys

import torch

from model.text_encoder import FeatureCache, T5TextEncoder


def test_repeated_prompts_reuse_exact_features_and_the_cache_stays_bounded(t5_dir):
    cached = T5TextEncoder.from_dir(t5_dir)
    fresh = T5TextEncoder.from_dir(t5_dir, cache_bytes=0)
    first = cached.encode(["a red circle", "a red circle", "a blue square"])
    assert (cached.cache.hits, cached.cache.misses) == (0, 2)  # n > 1 of one prompt: encoded once
    again = cached.encode(["a blue square", "a red circle"])
    assert (cached.cache.hits, cached.cache.misses) == (2, 2)
    reference = fresh.encode(["a blue square", "a red circle"])
    assert torch.equal(again.memory.features, reference.memory.features)
    assert torch.equal(first.memory.features[2], reference.memory.features[0])
    assert fresh.cache.bytes == 0 and fresh.cache.hits == 0

    one = cached.cache.bytes // 2  # room for about one entry
    small = T5TextEncoder.from_dir(t5_dir, cache_bytes=one + 1)
    small.encode(["a red circle"])
    small.encode(["a blue square"])
    assert small.cache.bytes <= one + 1 and len(small.cache) == 1


def test_the_cache_bound_counts_the_prompt_strings_too():
    features = torch.zeros(1, 4)  # 16 bytes: small next to the prompts
    cache = FeatureCache(max_bytes=50_000)
    prompts = [f"{i} " + "a long prompt " * 700 for i in range(20)]  # ~10 kB each
    for prompt in prompts:
        cache.put(prompt, features)
    assert cache.bytes <= 50_000 and 0 < len(cache) <= 5
    kept = prompts[-len(cache) :]  # the newest stay
    assert cache.bytes == sum(sys.getsizeof(p) + 16 for p in kept) and cache.get(prompts[-1]) is not None
    cache.put("x" * 60_000, features)  # larger than the whole bound: not kept
    assert cache.get("x" * 60_000) is None and cache.bytes <= 50_000
