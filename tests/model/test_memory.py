"""Memory readings: the CPU's current resident set, and what happens where /proc is absent."""

from __future__ import annotations

import logging

import torch

from model import memory


def test_cpu_reports_the_current_resident_set_and_at_least_as_large_a_peak():
    usage = memory.device_memory(torch.device("cpu"))
    assert set(usage.in_use) == set(usage.peak) == {"rss"}
    assert 0 < usage.in_use["rss"] <= usage.peak["rss"]


def test_without_proc_rss_falls_back_to_the_peak_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(memory, "STATM", tmp_path / "no-proc" / "statm")
    memory._warn_no_current_rss.cache_clear()
    with caplog.at_level(logging.WARNING, logger="model.memory"):
        first = memory.device_memory(torch.device("cpu"))
        memory.device_memory(torch.device("cpu"))
    assert first.in_use["rss"] == first.peak["rss"] > 0
    assert len([r for r in caplog.records if "reports the peak" in r.message]) == 1  # not once per scrape
    memory._warn_no_current_rss.cache_clear()
