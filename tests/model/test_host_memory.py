"""Retained host memory: a worker thread's large tensors reuse freed memory instead of page-faulting
fresh pages each time (model/host_memory.py). Each case runs in its own process: the setting is the
process's for good."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import resource, sys, threading
import torch
from model.host_memory import retain_freed_memory

if sys.argv[1] == "retain":
    assert retain_freed_memory()
faults = []

def cycle():  # as a request on a server's worker thread: large activations, allocated and freed in turn
    a = torch.ones(16 << 20)  # 64 MiB
    b = torch.ones(4 << 20) + a[: 4 << 20]
    del a
    c = torch.ones(24 << 20)
    del b, c

def work():
    for _ in range(16):  # the first requests: the heap grows to what the sequence needs, faulting it in
        cycle()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        cycle()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

t = threading.Thread(target=work)
t.start()
t.join()
print(faults[0])
"""


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_retained_memory_serves_a_threads_large_tensors_without_new_page_faults():
    pages = (64 << 20) // 4096  # per 64 MiB
    assert page_faults("system") > 8 * pages  # glibc's defaults: each large tensor mmapped and faulted in anew
    assert page_faults("retain") < pages // 8  # kept: once the heap has grown, freed blocks are reused
