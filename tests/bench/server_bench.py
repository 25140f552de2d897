"""Load generator: the real `serve` process on loopback vs the same work called directly on the pipeline.

    python -m tests.bench.server_bench [--requests 48] [--max-seconds 120]

Starts `infinity-serve serve` (the embedded default model) as a child process, sends a bounded
number of requests at concurrency 1, 4 and 16, and prints throughput, latency percentiles, the
batching gain and the HTTP overhead as ratios measured in the same run. The direct runs load the
same model in this process. The server is a separate process, as in production: a server thread
here would share the interpreter lock with the clients, and a second OpenMP pool would
oversubscribe the cores (generation measured 1.65x slower that way).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from model.config import RuntimeConfig, SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from tests.bench.load_test import start_server
from tests.bench.prompts import PROMPTS
from tests.server.conftest import free_port
from weights.default import load_default_pipeline


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(url: str, concurrency: int, count: int, max_seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    issued = iter(range(count))
    stop_at = time.monotonic() + max_seconds

    def worker() -> None:
        nonlocal errors
        with httpx.Client(base_url=url, timeout=300) as client:
            for i in issued:
                if time.monotonic() > stop_at:
                    return
                t0 = time.perf_counter()
                r = client.post("/generate", json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    errors += r.status_code != 200

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "n": len(latencies),
        "errors": errors,
        "images_s": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
    }


def direct(pipe: InfinityPipeline, schedule: ScaleSchedule, batch: int, count: int) -> float:
    """Images per second calling the pipeline in-process with batches of `batch`."""
    start = time.perf_counter()
    done = 0
    while done < count:
        b = min(batch, count - done)
        pipe.generate(
            [PROMPTS[(done + j) % len(PROMPTS)] for j in range(b)],
            schedule,
            [SamplingParams(seed=done + j) for j in range(b)],
        )
        done += b
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args()
    pipe, default = load_default_pipeline(RuntimeConfig())
    schedule = default.schedule
    pipe.generate(["warm-up"], schedule, SamplingParams(seed=0))
    port = free_port()
    proc = start_server(port, max_queue=256, max_batch=16, log=Path(tempfile.mkdtemp()) / "server.log")
    print(
        f"# server benchmark: the embedded default model, `serve` process on loopback, max_batch_size 16, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    rows = []
    try:
        for c in (1, 4, 16):
            count = max(args.requests, 2 * c)
            r = load(f"http://127.0.0.1:{port}", c, count, args.max_seconds)
            rows.append((c, r, direct(pipe, schedule, c, count)))
    finally:
        proc.terminate()
        proc.wait(30)
    print(
        "| concurrency | requests | errors | HTTP images/s | p50 s | p95 s | direct images/s (batch = concurrency) "
        "| HTTP / direct |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for c, r, d in rows:
        print(
            f"| {c} | {r['n']} | {r['errors']} | {r['images_s']:.2f} | {r['p50']:.3f} | {r['p95']:.3f} | {d:.2f} "
            f"| {r['images_s'] / d:.2f} |"
        )
    http1, http16 = rows[0][1]["images_s"], rows[-1][1]["images_s"]
    print(f"\nbatching gain (HTTP concurrency 16 / concurrency 1): {http16 / http1:.2f}x")
    print(
        f"HTTP overhead at concurrency 1 (HTTP time per image / direct batch-1 time per image): "
        f"{rows[0][2] / http1:.2f}x"
    )


if __name__ == "__main__":
    main()
