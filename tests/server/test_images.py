"""The `url` image store: unguessable ids, expiry, bounded memory."""

from __future__ import annotations

import time
from typing import get_args

from server import images
from server.images import CONTENT_TYPES, ImageStore, OutputFormat, StoredImage


def test_the_output_formats_are_the_content_types_keys():
    assert get_args(OutputFormat) == tuple(CONTENT_TYPES) == ("png", "jpeg", "webp")


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
    third = store.put(b"c" * 50, "image/png")  # over the bound: the oldest goes
    assert store.get(first) is None and store.get(second) and store.get(third)
    assert store.size_bytes == 80 <= 100


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_only_the_expired_images_go_and_their_bytes_with_them(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(images, "time", clock)
    store = ImageStore(ttl_s=10, max_bytes=10_000)
    early = store.put(b"e" * 100, "image/png")
    clock.now += 5
    late = store.put(b"l" * 10, "image/png")
    clock.now += 6  # early expired, late has 4 s left
    assert store.get(early) is None and store.get(late).data == b"l" * 10 and store.size_bytes == 10
    clock.now += 4
    assert store.get(late) is None and store.size_bytes == 0


class _CountedImage(StoredImage):
    """Counts reads of `expires`: how many stored images an eviction looked at."""

    reads = 0

    def __getattribute__(self, name: str):
        if name == "expires":
            type(self).reads += 1
        return super().__getattribute__(name)


def test_eviction_looks_at_the_expired_images_only_not_every_stored_one(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(images, "time", clock)
    monkeypatch.setattr(images, "StoredImage", _CountedImage)
    store = ImageStore(ttl_s=10, max_bytes=10**9)
    ids = [store.put(b"x", "image/png") for _ in range(2_000)]  # a full scan would read 2,000
    _CountedImage.reads = 0
    assert store.get(ids[-1]) is not None and store.get("unknown") is None
    assert _CountedImage.reads <= 2  # one look at the oldest per request
    clock.now += 10  # all expire at once: each looked at once
    _CountedImage.reads = 0
    assert store.get(ids[0]) is None and store.size_bytes == 0
    assert _CountedImage.reads <= 2_001
