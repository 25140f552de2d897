"""The load test's short version: the real `serve` process at 4x its queue bound (see tests/bench/load_test.py)."""

from __future__ import annotations

from tests.bench.load_test import run_load


def test_overload_ends_every_request_cleanly_and_nobody_gets_another_image():
    report = run_load(requests=60, concurrency=16, max_queue=4, max_batch=4, recheck=8)
    print(report.table())
    assert report.failures(max_rss_growth=0.25) == [], report.table()
    assert report.served >= 4 and report.rejected.get(429, 0) >= 4, "the run did not reach overload"
    assert report.checked_images >= 4
