"""model/kv_cache.py: a self-attention cache preallocated for a whole schedule, written in place."""

import pytest
import torch

from model.config import TRANSFORMER_SIZES
from model.kv_cache import KVCache
from model.schedules import ScaleSchedule

DEPTH, BATCH, HEADS, HEAD_DIM = 3, 2, 2, 4
SCHEDULE = ScaleSchedule.official(1.0, "0.06M")  # 7 scales, 521 tokens


def _cache(total=SCHEDULE.total_tokens, dtype=torch.float32, batch=BATCH) -> KVCache:
    return KVCache.allocate(DEPTH, batch, HEADS, total, HEAD_DIM, dtype, "cpu")


def _kv(tokens, seed, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, tokens, HEAD_DIM, generator=g),
        torch.randn(batch, HEADS, tokens, HEAD_DIM, generator=g),
    )


def _fill(cache: KVCache, lengths) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Write every layer for each scale, as a forward pass does; returns what was written per scale."""
    written = []
    for s, n in enumerate(lengths):
        k, v = _kv(n, seed=s)
        for layer in range(DEPTH):
            cache.write(layer, k + layer, v - layer)
        cache.advance(n)
        written.append((k, v))
    return written


def test_allocate_preallocates_the_whole_schedule():
    cache = _cache(dtype=torch.bfloat16)
    for t in (cache.keys, cache.values):
        assert t.shape == (DEPTH, BATCH, HEADS, SCHEDULE.total_tokens, HEAD_DIM)
        assert t.dtype == torch.bfloat16 and t.device.type == "cpu"
    assert cache.filled == 0
    assert cache.keys.data_ptr() != cache.values.data_ptr()


@pytest.mark.parametrize("dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_bytes_per_row_is_what_one_batch_row_allocates(dtype, itemsize):
    per_row = KVCache.bytes_per_row(DEPTH, HEADS, SCHEDULE.total_tokens, HEAD_DIM, dtype)
    assert per_row == 2 * DEPTH * HEADS * SCHEDULE.total_tokens * HEAD_DIM * itemsize
    cache = _cache(dtype=dtype, batch=3)
    assert cache.keys.nbytes + cache.values.nbytes == 3 * per_row


def test_bytes_per_row_of_the_2b_model_at_1m():
    c = TRANSFORMER_SIZES["2b"]
    L = ScaleSchedule.official(1.0, "1M").total_tokens  # 10521 (fact sheet 4.2)
    assert KVCache.bytes_per_row(c.depth, c.num_heads, L, c.head_dim, torch.bfloat16) == 2 * 32 * 16 * 10521 * 128 * 2


def test_scales_are_appended_in_place_and_the_visible_prefix_grows():
    cache = _cache()
    keys_storage = cache.keys.data_ptr()
    lengths = SCHEDULE.lengths[:3]  # 1, 4, 16 tokens
    written = []
    for s, n in enumerate(lengths):
        k, v = _kv(n, seed=s)
        for layer in range(DEPTH):
            seen_k, seen_v = cache.write(layer, k + layer, v - layer)
            assert seen_k.shape == seen_v.shape == (BATCH, HEADS, sum(lengths[: s + 1]), HEAD_DIM)
            assert seen_k.data_ptr() == cache.keys[layer].data_ptr()  # a view of the cache, not a copy
            assert cache.filled == sum(lengths[:s])  # writing does not advance
        cache.advance(n)
        written.append((k, v))
    assert cache.filled == sum(lengths) and cache.keys.data_ptr() == keys_storage
    for layer in range(DEPTH):
        expected_k = torch.cat([k + layer for k, _ in written], dim=2)
        expected_v = torch.cat([v - layer for _, v in written], dim=2)
        assert torch.equal(cache.keys[layer, :, :, : cache.filled], expected_k)
        assert torch.equal(cache.values[layer, :, :, : cache.filled], expected_v)


def test_a_later_scale_does_not_touch_earlier_entries():
    cache = _cache()
    _fill(cache, SCHEDULE.lengths[:2])
    before = cache.keys[:, :, :, : cache.filled].clone()
    _fill(cache, SCHEDULE.lengths[2:4])
    assert torch.equal(cache.keys[:, :, :, : before.shape[3]], before)


def test_the_whole_schedule_fits_exactly_and_one_more_token_is_refused():
    cache = _cache(total=sum(SCHEDULE.lengths[:4]))
    _fill(cache, SCHEDULE.lengths[:4])
    assert cache.filled == cache.keys.shape[3]
    with pytest.raises(RuntimeError, match="overflow"):
        cache.advance(1)


def test_a_write_past_the_end_is_refused_not_truncated():
    cache = _cache(total=5)
    _fill(cache, (4,))
    k, v = _kv(2, seed=9)
    with pytest.raises(RuntimeError):
        cache.write(0, k, v)


def test_writes_are_cast_to_the_cache_dtype():
    cache = _cache(dtype=torch.bfloat16)
    k, v = _kv(4, seed=1)
    seen_k, seen_v = cache.write(0, k, v)
    assert seen_k.dtype == seen_v.dtype == torch.bfloat16
    assert torch.equal(seen_k, k.bfloat16()) and torch.equal(seen_v, v.bfloat16())


def test_select_keeps_only_the_given_rows_and_the_fill_level():
    cache = _cache(batch=4)
    for s, n in enumerate(SCHEDULE.lengths[:2]):
        k, v = _kv(n, seed=s, batch=4)
        for layer in range(DEPTH):
            cache.write(layer, k, v)
        cache.advance(n)
    rows = torch.tensor([0, 3])
    part = cache.select(rows)
    assert part.filled == cache.filled == 5
    assert part.keys.shape == (DEPTH, 2, HEADS, SCHEDULE.total_tokens, HEAD_DIM)
    assert torch.equal(part.keys[:, :, :, :5], cache.keys[:, rows, :, :5])
    assert torch.equal(part.values[:, :, :, :5], cache.values[:, rows, :, :5])
    # the selected cache continues on its own: the next scale lands after the kept prefix
    k, v = _kv(16, seed=7, batch=2)
    seen_k, _ = part.write(0, k, v)
    assert seen_k.shape[2] == 21 and torch.equal(seen_k[:, :, 5:], k)
