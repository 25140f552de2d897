"""Load generator: the real server on loopback vs the same work called directly on the pipeline.

    python -m tests.bench.server_bench [--size small] [--requests 24] [--max-seconds 120]

Starts the app on 127.0.0.1 (random-weight model of the given size, tiny VAE and T5), sends a
bounded number of requests at concurrency 1, 4 and 16, and prints throughput, latency
percentiles, the batching gain and the HTTP overhead as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import replace

import httpx
import torch

from model.config import TRANSFORMER_SIZES, VAE_SIZES, SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.t5_builder import build_t5_encoder_dir
from model.text_encoder import T5TextEncoder
from server.app import create_app
from server.engine import Engine
from server.metrics import Metrics
from server.service import ModelLimits
from server.settings import Settings
from tests.server.conftest import running_server

PROMPTS = ["a red circle", "two blue squares", "a green star to the left of a red circle", "three yellow triangles"]


def build_pipeline(size: str, tmp: str) -> InfinityPipeline:
    vae = VAE_SIZES["tiny"]
    config = replace(TRANSFORMER_SIZES[size], token_bits=vae.token_bits, text_channels=32, text_maxlen=32, pool_heads=1)
    t5 = build_t5_encoder_dir(tmp, " ".join(PROMPTS).split(), d_model=32)
    from model.transformer import Infinity
    from model.vae import BitwiseVAE
    return InfinityPipeline(Infinity(config), BitwiseVAE(vae), T5TextEncoder.from_dir(t5))


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
    return {"n": len(latencies), "errors": errors, "images_s": len(latencies) / wall,
            "p50": statistics.median(latencies), "p95": percentile(latencies, 0.95)}


def direct(pipe: InfinityPipeline, schedule: ScaleSchedule, batch: int, count: int) -> float:
    """Images per second calling the pipeline in-process with batches of `batch`."""
    start = time.perf_counter()
    done = 0
    while done < count:
        b = min(batch, count - done)
        pipe.generate([PROMPTS[(done + j) % len(PROMPTS)] for j in range(b)], schedule,
                      [SamplingParams(seed=done + j) for j in range(b)])
        done += b
    return count / (time.perf_counter() - start)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "mid"])
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-seconds", type=float, default=120)
    args = parser.parse_args()
    pipe = build_pipeline(args.size, tempfile.mkdtemp())
    schedule = ScaleSchedule.official(1.0, "0.06M")
    pipe.generate(["warm-up"], schedule, SamplingParams(seed=0))
    settings = Settings(max_batch_size=16, max_n=1, max_wait_ms=10, max_queue=256, warmup=False)
    engine = Engine({"cpu": pipe}, Metrics(), 16, 10, 256)
    engine.start()
    app = create_app(settings, engine, ModelLimits(f"bench-{args.size}", "0.06M", "0.06M"))

    print(f"# server benchmark: transformer {args.size} (random weights), tiny VAE, template 1.0 pn 0.06M, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, loopback HTTP, max_batch_size 16\n")
    rows = []
    with running_server(app) as url:
        for c in (1, 4, 16):
            r = load(url, c, max(args.requests, 2 * c), args.max_seconds)
            rows.append((c, r, direct(pipe, schedule, c, max(args.requests, 2 * c))))
    print("| concurrency | requests | errors | HTTP images/s | p50 s | p95 s | direct images/s (batch = concurrency) "
          "| HTTP / direct |")
    print("|---|---|---|---|---|---|---|---|")
    for c, r, d in rows:
        print(f"| {c} | {r['n']} | {r['errors']} | {r['images_s']:.2f} | {r['p50']:.3f} | {r['p95']:.3f} | {d:.2f} "
              f"| {r['images_s'] / d:.2f} |")
    http1, http16 = rows[0][1]["images_s"], rows[-1][1]["images_s"]
    print(f"\nbatching gain (HTTP concurrency 16 / concurrency 1): {http16 / http1:.2f}x")
    print(f"HTTP overhead at concurrency 1 (HTTP time per image / direct batch-1 time per image): "
          f"{rows[0][2] / http1:.2f}x")
    engine.drain(10)


if __name__ == "__main__":
    main()
