"""Load generator: the real `serve` process on loopback vs the same work called directly on the pipeline.

    python -m tests.bench.server_bench [--requests 48] [--max-seconds 120]
    python -m tests.bench.server_bench --open-loop [--requests 120] [--loads 0.3,0.5,0.7]

Open loop (`--open-loop`): static vs continuous batching (`--batching`), each in its own `serve`
process, under Poisson arrivals that do not wait for answers (as real traffic). Per mode: the lone
request's latency (median of 10 sent one at a time), the saturation throughput (closed loop at
concurrency 16), then arrivals at each fraction of the static batcher's saturation: p50/p95/p99 and
their ratio to the lone latency. The same arrival times (one seed) for both modes.

Starts `infinity-serve serve` (the embedded default model) as a child process, sends a bounded
number of requests at concurrency 1, 4 and 16, and prints throughput, latency percentiles, the
batching gain and the HTTP overhead as ratios measured in the same run. The direct runs load the
same model in this process. The server is a separate process, as in production: a server thread
here would share the interpreter lock with the clients, and a second OpenMP pool would
oversubscribe the cores (generation measured 1.65x slower that way).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

from model.config import RuntimeConfig, SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from server.engine import Engine, GenerationRequest
from server.main import in_own_thread
from server.metrics import Metrics
from tests.bench.load_test import start_server
from tests.bench.prompts import PROMPTS
from tests.server.conftest import free_port
from weights.default import load_default_pipeline


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_all(threads: list[threading.Thread]) -> float:
    """Start the threads, wait for all; the wall seconds they took."""
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def summary(latencies: list[float], errors: int, wall: float) -> dict[str, float]:
    return {
        "n": len(latencies),
        "errors": errors,
        "images_s": len(latencies) / wall,
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
    }


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

    wall = run_all([threading.Thread(target=worker) for _ in range(concurrency)])
    return summary(latencies, errors, wall)


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


def lone_latency(url: str, count: int = 10) -> float:
    with httpx.Client(base_url=url, timeout=300) as client:
        times = []
        for i in range(count):
            t0 = time.perf_counter()
            client.post("/generate", json={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}).raise_for_status()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def poisson(rate: float, count: int, seed: int = 0) -> list[float]:
    """Arrival times (seconds from the start) of `count` requests at `rate` per second; rate 0: all at once."""
    rng, t, times = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        times.append(t)
    return times


def send_at(arrivals: list[float], send_one: Callable[[int], bool]) -> dict[str, float]:
    """Request i sent at arrivals[i] on its own thread, whatever the earlier ones are doing (open loop);
    `send_one(i)` sends it and says whether it succeeded."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    start = time.perf_counter()

    def send(i: int) -> None:
        nonlocal errors
        delay = start + arrivals[i] - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        t0 = time.perf_counter()
        ok = send_one(i)
        with lock:
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    run_all([threading.Thread(target=send, args=(i,)) for i in range(len(arrivals))])
    return summary(latencies, errors, time.perf_counter() - start)


def open_loop(url: str, rate: float, count: int, seed: int = 0) -> dict[str, float]:
    """`count` requests to the server at Poisson arrival times of `rate` per second."""
    limits = httpx.Limits(max_connections=count)
    with httpx.Client(base_url=url, timeout=300, limits=limits) as client:

        def send_one(i: int) -> bool:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}
            return client.post("/generate", json=body).status_code == 200

        return send_at(poisson(rate, count, seed), send_one)


def compare_batching(requests: int, loads: list[float], max_batch: int, max_seconds: float) -> None:
    """Static vs continuous batching under open-loop arrivals (see the module docstring)."""
    measured: dict[str, dict] = {}
    rates: list[float] = []
    for mode in ("static", "continuous"):
        port = free_port()
        log = Path(tempfile.mkdtemp()) / f"server-{mode}.log"
        env = {"INFINITY_BATCHING": mode}
        proc = start_server(port, max_queue=4 * requests, max_batch=max_batch, log=log, extra_env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            lone = lone_latency(url)
            saturation = load(url, 16, max(48, 2 * max_batch), max_seconds)["images_s"]
            rates = rates or [round(f * saturation, 2) for f in loads]  # the static batcher's, for both
            runs = [(rate, open_loop(url, rate, requests)) for rate in rates]
        finally:
            proc.terminate()
            proc.wait(30)
        measured[mode] = {"lone": lone, "saturation": saturation, "runs": runs}
    print_comparison("the embedded default model, HTTP", measured, loads, requests, max_batch)


def engine_open_loop(engine: Engine, schedule: ScaleSchedule, rate: float, count: int, seed: int = 0) -> dict:
    """`open_loop` straight into an in-process engine (no HTTP): for shapes too slow for many requests.
    Rate 0: every request at once."""

    def send_one(i: int) -> bool:
        params = (SamplingParams(seed=i),)
        request = GenerationRequest(f"r{i}", PROMPTS[i % len(PROMPTS)], schedule, params, time.monotonic() + 3600)
        return bool(engine.submit(request).future.result().images)

    return send_at(poisson(rate, count, seed), send_one)


def compare_batching_in_process(shape: str, requests: int, loads: list[float], max_batch: int) -> None:
    """Static vs continuous on a larger shape with random weights (bf16, 0.06M), in this process."""
    from tests.bench.perf_bench import pipeline as random_pipeline

    schedule = ScaleSchedule.official(1.0, "0.06M")

    def load() -> InfinityPipeline:
        with tempfile.TemporaryDirectory() as tmp:
            pipe = random_pipeline(shape, "bfloat16", torch.device("cpu"), "off", Path(tmp))
        pipe.generate(["warm-up"], schedule, SamplingParams(seed=0))
        return pipe

    # Off the main thread, as `serve` loads: torch work on two threads halves the engine worker's speed
    # (two OpenMP pools on 2 cores: server/main.py `in_own_thread`).
    pipe = in_own_thread(load)
    measured: dict[str, dict] = {}
    rates: list[float] = []
    for mode in ("static", "continuous"):
        engine = Engine({"cpu": pipe}, Metrics().for_model(shape), max_batch, 10.0, 4 * requests, batching=mode)
        engine.start()
        try:
            lone = statistics.median(engine_open_loop(engine, schedule, 0.0, 1)["p50"] for _ in range(3))
            saturation = engine_open_loop(engine, schedule, 0.0, 2 * max_batch)["images_s"]  # all at once
            rates = rates or [round(f * saturation, 3) for f in loads]
            runs = [(rate, engine_open_loop(engine, schedule, rate, requests)) for rate in rates]
        finally:
            engine.drain(600)
        measured[mode] = {"lone": lone, "saturation": saturation, "runs": runs}
    print_comparison(
        f"the {shape} shape (random weights, bf16, 0.06M), in process", measured, loads, requests, max_batch
    )


def print_comparison(what: str, measured: dict[str, dict], loads: list[float], requests: int, max_batch: int) -> None:
    print(
        f"# open loop: static vs continuous batching, {what}, max_batch_size {max_batch}, "
        f"{requests} Poisson arrivals per rate, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    print("| batching | lone s | saturation images/s |")
    print("|---|---|---|")
    for mode, m in measured.items():
        print(f"| {mode} | {m['lone']:.3f} | {m['saturation']:.2f} |")
    print(
        "\n| arrivals / s (of static saturation) | batching | done / errors | images/s | p50 s | p95 s | p99 s "
        "| p50 / lone | p95 / lone |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    lone = measured["static"]["lone"]  # one yardstick for both
    for i, load_fraction in enumerate(loads):
        for mode, m in measured.items():
            rate, r = m["runs"][i]
            print(
                f"| {rate:.2f} ({load_fraction:.0%}) | {mode} | {r['n']} / {r['errors']} | {r['images_s']:.2f} "
                f"| {r['p50']:.3f} | {r['p95']:.3f} | {r['p99']:.3f} | **{r['p50'] / lone:.2f}x** "
                f"| **{r['p95'] / lone:.2f}x** |"
            )
    ratio = measured["continuous"]["saturation"] / measured["static"]["saturation"]
    print(f"\nsaturation throughput, continuous / static: **{ratio:.2f}x**\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-seconds", type=float, default=120)
    parser.add_argument("--open-loop", action="store_true", help="static vs continuous batching, Poisson arrivals")
    parser.add_argument("--loads", default="0.3,0.5,0.7", help="open loop: fractions of saturation throughput")
    parser.add_argument("--max-batch", type=int, default=8, help="open loop: max_batch_size")
    parser.add_argument("--shape", help="open loop on this random-weight shape (e.g. mid), in process, not HTTP")
    args = parser.parse_args()
    if args.open_loop:
        loads = [float(x) for x in args.loads.split(",")]
        if args.shape:
            return compare_batching_in_process(args.shape, args.requests, loads, args.max_batch)
        return compare_batching(args.requests, loads, args.max_batch, args.max_seconds)
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
