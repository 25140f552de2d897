"""Which thread runs a CPU pipeline's torch work, and why it matters.

PyTorch's CPU ops run on OpenMP, and an OpenMP thread pool belongs to the thread that first runs a
parallel op, for as long as that thread lives. A pipeline built (weights loaded, initialised) on one
thread and run on another leaves two pools on the cores; libgomp then stops spinning between ops and
each op pays a thread wake-up. Measured on 2 cores with the default model: `generate` 52 ms on the
thread that built it, 100-110 ms on a worker thread while the building thread lived on, 53 ms once it
had exited (docs/cli-and-python-api.md). `serve` builds in a short-lived thread for this reason
(server/main.py `in_own_thread`); `BuildingThread` warns a library user who does not.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)


class BuildingThread:
    """The thread a CPU pipeline was built on; `check()` on each run warns once if the run is on another
    thread while the building one still lives (the case that halves CPU speed)."""

    def __init__(self, device: torch.device) -> None:
        self._thread = threading.current_thread()
        self._relevant = device.type == "cpu"
        self._warned = False

    def check(self) -> None:
        if not self._relevant or self._warned or torch.get_num_threads() < 2:
            return
        current = threading.current_thread()
        if current is self._thread or not self._thread.is_alive():
            return
        self._warned = True
        log.warning(
            "this CPU pipeline was built on thread %r, which is still running, and now runs on thread %r: "
            "two OpenMP pools then share the cores and every op waits for a thread wake-up (measured 2x "
            "slower on 2 cores). Build it in a thread that exits (as `serve` does) or run it where it "
            "was built: docs/cli-and-python-api.md, 'Threads and host memory on CPU'.",
            self._thread.name,
            current.name,
        )
