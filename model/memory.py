"""Memory a device holds now and at its peak, by kind: what the server exports as two gauges.

Kept apart because "in use" and "peak" are different questions: the CPU's `ru_maxrss` only ever grows,
so exporting it as memory in use would hide a server that has given memory back.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

STATM = Path("/proc/self/statm")  # Linux: sizes in pages; the second field is the resident set


@dataclass(frozen=True)
class MemoryUsage:
    in_use: dict[str, int]  # bytes by kind, now: CUDA "allocated"/"reserved", CPU "rss"
    peak: dict[str, int]  # bytes by kind, the most since the process (CUDA: its allocator) started


def device_memory(device: torch.device) -> MemoryUsage:
    """CUDA: the caching allocator's counters. Otherwise the whole process's resident set."""
    if device.type == "cuda":
        return MemoryUsage(
            in_use={"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device)},
            peak={
                "allocated": torch.cuda.max_memory_allocated(device),
                "reserved": torch.cuda.max_memory_reserved(device),
            },
        )
    current = _current_rss()
    peak = _peak_rss()
    if current is None:
        return MemoryUsage(in_use={"rss": peak}, peak={"rss": peak})
    # Other threads allocate between the two reads: the peak is at least what was just resident.
    return MemoryUsage(in_use={"rss": current}, peak={"rss": max(peak, current)})


def _peak_rss() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _current_rss() -> int | None:
    """The resident set now, or None where /proc is absent (macOS): then "rss" reports the peak."""
    try:
        resident_pages = int(STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        _warn_no_current_rss()
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@functools.cache
def _warn_no_current_rss() -> None:
    # Once, not per scrape: the fallback holds for the life of the process.
    log.warning('%s is not readable: memory kind "rss" reports the peak resident set, not the current one', STATM)
