"""The GPU check's CPU form, end to end in CI, so that the command cannot rot before a GPU run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.gpu.gpu_check import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_on_cpu_and_every_row_passes(tmp_path):
    out = tmp_path / "gpu-check.md"
    command = [sys.executable, "-m", "tests.gpu.gpu_check", "--device", "cpu", "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ")][1:]
    parts = {r[0].lstrip("| ") for r in rows}
    assert parts == {"environment", "tests", "serve", "perf"}, parts
    assert all(r[2] == "pass" for r in rows), out.read_text()
    assert sum(r[0] == "| tests" for r in rows) >= 8  # one row per test marked cuda
