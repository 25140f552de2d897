"""Load and soak test: the real `serve` process on loopback, driven well past its queue bound.

    python -m tests.bench.load_test [--requests 300] [--concurrency 32] [--max-queue 8]

Starts `infinity-serve serve` (the embedded default model) as a child process and sends a
bounded number of requests, alternating the REST and OpenAI endpoints, each with its own prompt
and seed, at a concurrency several times the queue bound (a client pauses 0.1 s after a
rejection, then sends its next request). Checks, and prints as one table:

- every request ends with its images or a clean 429/503 (JSON error, Retry-After); none hangs
  (client timeout) and none fails otherwise;
- nobody gets another request's image: a sample of the served requests is asked again alone
  (batch of one) and must give the same pixels; the seeds echo the request's;
- memory stays flat: the server's RSS after the first quarter of the run vs at the end;
- the queue-depth metric is back to zero at the end.

Exit status 1 when a check fails. `run_load()` is what the CI test calls with small numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.server.conftest import free_port

PROMPTS = [
    "a red circle",
    "a blue square",
    "two green stars",
    "a yellow triangle to the left of a purple circle",
    "three orange squares",
    "a pink star and a cyan triangle",
]
REJECTIONS = {429, 503}
REJECTION_PAUSE_S = 0.1


@dataclass
class Outcome:
    index: int
    status: int  # 0: transport error or client timeout (a hang)
    seconds: float
    pixels: np.ndarray | None = None
    clean: bool = True  # a rejection with JSON error body and Retry-After


@dataclass
class Report:
    sent: int = 0
    served: int = 0
    rejected: dict[int, int] = field(default_factory=dict)
    failed: int = 0  # anything else: 5xx, 4xx that should not be, hang
    unclean_rejections: int = 0
    wrong_images: int = 0
    checked_images: int = 0
    p50: float = 0.0
    p95: float = 0.0
    rss_start_mb: float = 0.0  # after the first quarter of the requests
    rss_end_mb: float = 0.0
    rss_peak_mb: float = 0.0
    final_queue_depth: float = -1.0
    seconds: float = 0.0
    server_log: Path | None = None

    @property
    def rss_growth(self) -> float:
        return self.rss_end_mb / max(self.rss_start_mb, 1e-9) - 1

    def failures(self, max_rss_growth: float = 0.10) -> list[str]:
        problems = []
        if self.failed:
            problems.append(f"{self.failed} requests failed or hung")
        if self.unclean_rejections:
            problems.append(f"{self.unclean_rejections} rejections without a JSON error and Retry-After")
        if self.wrong_images:
            problems.append(f"{self.wrong_images} of {self.checked_images} re-checked images differ")
        if self.rss_growth > max_rss_growth:
            problems.append(f"RSS grew {self.rss_growth:.0%} (more than {max_rss_growth:.0%})")
        if self.final_queue_depth != 0:
            problems.append(f"queue depth {self.final_queue_depth} at the end")
        if self.served + sum(self.rejected.values()) + self.failed != self.sent:
            problems.append("requests unaccounted for")
        return problems

    def table(self) -> str:
        rows = [
            ("requests sent", self.sent),
            ("served (200)", self.served),
            ("rejected 429 (Retry-After)", self.rejected.get(429, 0)),
            ("rejected 503 (Retry-After)", self.rejected.get(503, 0)),
            ("failed / hung", self.failed),
            ("images re-checked alone / differing", f"{self.checked_images} / {self.wrong_images}"),
            ("latency p50 / p95 (served)", f"{self.p50:.2f} s / {self.p95:.2f} s"),
            (
                "server RSS after 1/4 -> end (peak)",
                f"{self.rss_start_mb:.0f} -> {self.rss_end_mb:.0f} MB ({self.rss_peak_mb:.0f} MB), "
                f"{self.rss_growth:+.1%}",
            ),
            ("queue depth at the end", f"{self.final_queue_depth:g}"),
            ("wall time", f"{self.seconds:.1f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(
            [f"| {'measure'.ljust(width)} | value |", f"|{'-' * (width + 2)}|-------|"]
            + [f"| {k.ljust(width)} | {v} |" for k, v in rows]
        )


def _rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text)[1]) / 1024


def _body(index: int, openai: bool) -> dict:
    prompt, seed = PROMPTS[index % len(PROMPTS)], 1000 + index
    if openai:
        return {"prompt": prompt, "response_format": "b64_json", "seed": seed}
    return {"prompt": prompt, "seed": seed}


def _pixels(response: httpx.Response, openai: bool, seed: int) -> np.ndarray:
    answer = response.json()
    item = answer["data"][0] if openai else answer["images"][0]
    assert item["seed"] == seed, f"seed {item['seed']} returned for a request with seed {seed}"
    data = item["b64_json"] if openai else item["b64"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


async def _one(client: httpx.AsyncClient, index: int, timeout: float) -> Outcome:
    openai = index % 2 == 1
    path = "/v1/images/generations" if openai else "/generate"
    start = time.monotonic()
    try:
        r = await client.post(path, json=_body(index, openai), timeout=timeout)
    except httpx.HTTPError:
        return Outcome(index, 0, time.monotonic() - start)
    seconds = time.monotonic() - start
    if r.status_code == 200:
        return Outcome(index, 200, seconds, _pixels(r, openai, 1000 + index))
    clean = r.headers.get("content-type", "").startswith("application/json") and "retry-after" in r.headers
    clean = clean and bool(r.json().get("error", {}).get("message"))
    return Outcome(index, r.status_code, seconds, clean=clean)


async def _drive(url: str, count: int, concurrency: int, timeout: float, pid: int, report: Report) -> list[Outcome]:
    outcomes: list[Outcome] = []
    rss: list[float] = []
    pending = iter(range(count))
    done = asyncio.Event()

    async def sampler() -> None:
        while not done.is_set():
            rss.append(_rss_mb(pid))
            await asyncio.sleep(0.25)

    async def worker(client: httpx.AsyncClient) -> None:
        for index in pending:
            outcomes.append(outcome := await _one(client, index, timeout))
            if len(outcomes) == max(1, count // 4):
                report.rss_start_mb = _rss_mb(pid)
            if outcome.status in REJECTIONS:
                # A short pause (shorter than Retry-After asks): keeps the pressure on without spinning.
                await asyncio.sleep(REJECTION_PAUSE_S)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        sampling = asyncio.create_task(sampler())
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        done.set()
        await sampling
    report.rss_end_mb, report.rss_peak_mb = _rss_mb(pid), max([*rss, _rss_mb(pid)])
    return outcomes


def _recheck(url: str, outcomes: list[Outcome], sample: int) -> tuple[int, int]:
    """Ask a spread sample of the served requests again, alone; count differing images."""
    served = [o for o in outcomes if o.status == 200]
    chosen = served[:: max(1, len(served) // sample)][:sample]
    wrong = 0
    with httpx.Client(base_url=url, timeout=120) as client:
        for o in chosen:
            openai = o.index % 2 == 1
            r = client.post("/v1/images/generations" if openai else "/generate", json=_body(o.index, openai))
            wrong += not np.array_equal(_pixels(r, openai, 1000 + o.index), o.pixels)
    return len(chosen), wrong


def _queue_depth(url: str) -> float:
    """Images queued, summed over the served models (each has its own queue and `model` series)."""
    text = httpx.get(f"{url}/metrics").text
    depths = re.findall(r"^infinity_queue_depth\{[^}]*\} (\S+)$", text, re.M)
    assert depths, "no infinity_queue_depth in /metrics"
    return sum(float(d) for d in depths)


def start_server(
    port: int, max_queue: int, max_batch: int, log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`infinity-serve serve` (the default model) as a child process; returns once /readyz is 200."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_MAX_N": "1", **(extra_env or {})}
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--port",
        str(port),
        "--max-queue",
        str(max_queue),
        "--max-batch-size",
        str(max_batch),
    ]
    # A file, not a pipe: a pipe nobody reads fills up with request logs and blocks the server.
    with log.open("w") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server never became ready")
        time.sleep(0.2)


def run_load(
    requests: int = 300,
    concurrency: int = 32,
    max_queue: int = 8,
    max_batch: int = 8,
    timeout: float = 120.0,
    recheck: int = 20,
) -> Report:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="load-test-")) / "server.log"
    proc = start_server(port, max_queue, max_batch, log)
    report = Report(sent=requests, server_log=log)
    try:
        start = time.monotonic()
        outcomes = asyncio.run(_drive(url, requests, concurrency, timeout, proc.pid, report))
        report.seconds = time.monotonic() - start
        time.sleep(0.5)  # the last batch's bookkeeping
        report.final_queue_depth = _queue_depth(url)
        report.checked_images, report.wrong_images = _recheck(url, outcomes, recheck)
    finally:
        proc.terminate()
        proc.wait(60)
    served = sorted(o.seconds for o in outcomes if o.status == 200)
    report.served = len(served)
    for o in outcomes:
        if o.status in REJECTIONS:
            report.rejected[o.status] = report.rejected.get(o.status, 0) + 1
            report.unclean_rejections += not o.clean
        elif o.status != 200:
            report.failed += 1
    if served:
        report.p50, report.p95 = served[len(served) // 2], served[min(len(served) - 1, int(0.95 * len(served)))]
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=8)
    args = p.parse_args()
    report = run_load(args.requests, args.concurrency, args.max_queue, args.max_batch)
    print(
        f"load test: {args.requests} requests, concurrency {args.concurrency} "
        f"({args.concurrency / args.max_queue:.0f}x the queue bound of {args.max_queue}), default model\n"
    )
    print(report.table())
    problems = report.failures()
    print("\nOK" if not problems else "\nFAILED: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
