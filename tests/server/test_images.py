"""The `url` image store: unguessable ids, expiry, bounded memory."""

from __future__ import annotations

import time

from server.images import ImageStore


def test_ids_are_random_and_unknown_ids_are_none():
    store = ImageStore(ttl_s=60, max_bytes=10_000)
    ids = {store.put(b"x" * 10, "image/png") for _ in range(50)}
    assert len(ids) == 50 and all(len(i) >= 40 and "/" not in i and "." not in i for i in ids)
    assert store.get("../../etc/passwd") is None and store.get("") is None


def test_images_expire():
    store = ImageStore(ttl_s=0.2, max_bytes=10_000)
    image_id = store.put(b"png-bytes", "image/png")
    assert store.get(image_id).data == b"png-bytes"
    time.sleep(0.3)
    assert store.get(image_id) is None and store.size_bytes == 0


def test_the_store_is_bounded_and_drops_the_oldest_first():
    store = ImageStore(ttl_s=60, max_bytes=100)
    first, second = store.put(b"a" * 60, "image/png"), store.put(b"b" * 30, "image/png")
    third = store.put(b"c" * 50, "image/png")                 # over the bound: the oldest goes
    assert store.get(first) is None and store.get(second) and store.get(third)
    assert store.size_bytes == 80 <= 100
