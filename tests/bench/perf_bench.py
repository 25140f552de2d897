"""Performance benchmark: one command, one run, every figure of the performance targets.

    python -m tests.bench.perf_bench                      # this CPU: tiny, mid, 2B shapes; bf16
    python -m tests.bench.perf_bench --device cuda        # GPU: 2B and 8B at 1024x1024, compile off/on

Random weights (speed does not depend on values) through the real InfinityPipeline: text encode
(a 1-layer random T5 of the model's text width), the scale loop with the KV cache, and the VAE
decode (real VAE architecture, one image at a time as served). Per row: seconds per image and
per stage, images/s, peak memory, and model FLOP utilisation = counted transformer FLOPs
(tests/bench/flops.py) / transformer seconds / the FLOP/s of a matmul of the model's own FFN
shape and dtype timed in the same run. Then, on CPU: KV cache vs recompute and bf16 vs fp32 (mid),
batch scaling of the shipped default model, HTTP overhead at concurrency 1, and the scale loop's
host syncs, ops per block and per-scale overhead on the tiny model (tests/bench/dispatch_bench.py). A last table
compares each figure with its target.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import TRANSFORMER_SIZES, RuntimeConfig, SamplingParams, TransformerConfig
from model.pipeline import InfinityPipeline
from model.schedules import PN_NAMES, ScaleSchedule
from model.t5_builder import build_t5_encoder_dir
from model.text_encoder import T5TextEncoder
from model.transformer import Infinity
from model.vae import BitwiseVAE
from tests.bench.dispatch_bench import report as dispatch_report
from tests.bench.flops import image_flops
from tests.bench.model_bench import VAE_FOR_BITS, build, run_cached, run_recompute
from tests.bench.prompts import PROMPTS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    size: str
    pn: str
    batch: int
    compile: str
    seconds: float = 0.0  # per batch, end to end
    text: float = 0.0
    transformer: float = 0.0
    vae: float = 0.0
    peak_mb: float = 0.0
    mfu: float = 0.0
    matmul_tflops: float = 0.0
    skipped: str = ""

    @property
    def per_image(self) -> float:
        return self.seconds / self.batch


# ---- memory -----------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- models -----------------------------------------------------------------------------------
def random_transformer(config: TransformerConfig, device: torch.device) -> Infinity:
    """Built on the meta device and filled in place: a 2B/8B model in seconds, not minutes."""
    with torch.device("meta"):
        model = Infinity(config)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return model


def pipeline(
    size: str, dtype: str, device: torch.device, compile_mode: str, tmp: Path, invariant: bool = True
) -> InfinityPipeline:
    config = TRANSFORMER_SIZES[size]
    t5 = build_t5_encoder_dir(
        tmp / f"t5-{config.text_channels}",
        " ".join(PROMPTS).split(),
        d_model=config.text_channels,
        num_layers=1,
        num_heads=8,
        d_ff=config.text_channels,
    )
    vae = BitwiseVAE(VAE_FOR_BITS[config.token_bits])
    runtime = RuntimeConfig(device=str(device), dtype=dtype, compile=compile_mode, batch_invariant=invariant)
    text = T5TextEncoder.from_dir(t5, device, max_length=config.text_maxlen)
    return InfinityPipeline(random_transformer(config, device), vae, text, runtime)


def matmul_tflops(config: TransformerConfig, rows: int, dtype: str, device: torch.device) -> float:
    """FLOP/s of the model's FFN matmul (rows x C) @ (C x F): the best case its kernels can reach."""
    m = max(64, min(rows, 8192))
    a = torch.randn(m, config.width, dtype=DTYPES[dtype], device=device)
    b = torch.randn(config.width, config.ffn_hidden, dtype=DTYPES[dtype], device=device)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0 or reps < 5:
        a @ b
        reps += 1
    sync(device)
    return 2 * m * config.width * config.ffn_hidden * reps / (time.perf_counter() - start) / 1e12


# ---- 1. latency, throughput, memory, MFU ------------------------------------------------------
def measure(
    pipe: InfinityPipeline,
    size: str,
    pn: str,
    batch: int,
    compile_mode: str,
    dtype: str,
    device: torch.device,
    repeats: int,
) -> Row:
    config, schedule = TRANSFORMER_SIZES[size], ScaleSchedule.official(1.0, pn)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    params = [SamplingParams(cfg=4.0, tau=1.0, seed=i) for i in range(batch)]
    pipe.generate(prompts, schedule, params)  # warm-up (and compile)
    reset_peak(device)
    best = None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = pipe.generate(prompts, schedule, params)
        sync(device)
        elapsed = time.perf_counter() - start
        if best is None or elapsed < best[0]:
            best = (elapsed, result.timings)
    elapsed, timings = best
    text_tokens = len(pipe.text_encoder.tokenizer(prompts[0])["input_ids"])
    flops = batch * image_flops(config, schedule, text_tokens)
    rows_last = 2 * batch * schedule.lengths[-1]
    peak = matmul_tflops(config, rows_last, dtype, device)
    return Row(
        size,
        pn,
        batch,
        compile_mode,
        elapsed,
        timings.text_encode,
        timings.transformer,
        timings.vae_decode,
        peak_mb(device),
        flops / timings.transformer / (peak * 1e12),
        peak,
    )


def speed_table(args, device: torch.device, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    print(
        "| size | pn | batch | compile | s / image | images / s | text s | transformer s | VAE s | "
        "peak MB | matmul TFLOP/s | MFU |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        for compile_mode in args.compile.split(","):
            pipe = pipeline(size, args.dtype, device, compile_mode, tmp, args.batch_invariant == "on")
            for pn in args.pns.split(","):
                for batch in (int(b) for b in args.batches.split(",")):
                    schedule = ScaleSchedule.official(1.0, pn)
                    tflop = batch * image_flops(TRANSFORMER_SIZES[size], schedule, 8) / 1e12
                    if tflop > args.max_tflop:
                        print(
                            f"| {size} | {pn} | {batch} | {compile_mode} | skipped: ~{tflop:.0f} TFLOP per batch "
                            f"> --max-tflop {args.max_tflop:g} |||||||||"
                        )
                        continue
                    r = measure(pipe, size, pn, batch, compile_mode, args.dtype, device, args.repeats)
                    rows.append(r)
                    print(
                        f"| {size} | {pn} | {batch} | {compile_mode} | {r.per_image:.3f} | {1 / r.per_image:.2f} | "
                        f"{r.text:.3f} | {r.transformer:.3f} | {r.vae:.3f} | {r.peak_mb:.0f} | "
                        f"{r.matmul_tflops:.2f} | {r.mfu:.0%} |",
                        flush=True,
                    )
            del pipe
    return rows


def kv_cache_table() -> None:
    """Bytes of KV cache per image (two rows with CFG) per schedule: what admission budgets with."""
    from model.kv_cache import KVCache

    pns = PN_NAMES
    print("\n| KV cache per image (bf16, CFG) | " + " | ".join(pns) + " |\n|---|" + "---|" * len(pns))
    for size in ("2b", "8b"):
        c = TRANSFORMER_SIZES[size]
        cells = [
            2
            * KVCache.bytes_per_row(
                c.depth, c.num_heads, ScaleSchedule.official(1.0, pn).total_tokens, c.head_dim, torch.bfloat16
            )
            / 2**20
            for pn in pns
        ]
        print(f"| {size} | " + " | ".join(f"{mb:.0f} MiB" for mb in cells) + " |")


# ---- 2. CPU-only comparisons ------------------------------------------------------------------
def cache_and_dtype(device: torch.device, repeats: int, invariant: bool) -> dict[str, float]:
    """Mid size, 0.06M: KV cache vs recomputing the prefix (batch 1), bf16 vs fp32 (batch 8)."""
    schedule = ScaleSchedule.official(1.0, "0.06M")
    out = {}
    for dtype in DTYPES:
        setup = build("mid", dtype, device, invariant)
        run_cached(setup, schedule, 1)
        out[f"cached {dtype}"] = min(sum(run_cached(setup, schedule, 1)) for _ in range(repeats))
        out[f"recompute {dtype}"] = min(run_recompute(setup, schedule, 1) for _ in range(repeats))
        out[f"batch8 {dtype}"] = min(sum(run_cached(setup, schedule, 8)) for _ in range(repeats))
    return out


def default_model_batching(repeats: int, invariant: bool) -> tuple[float, float]:
    """The shipped default model end to end: seconds per image at batch 1 and batch 8."""
    from weights.default import load_default_pipeline

    pipe, default = load_default_pipeline(RuntimeConfig(batch_invariant=invariant))
    per_image = {}
    for batch in (1, 8):
        prompts = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(batch)]
        params = [SamplingParams(seed=i) for i in range(batch)]
        pipe.generate(prompts, default.schedule, params)
        per_image[batch] = (
            min(_timed(lambda p=prompts, q=params: pipe.generate(p, default.schedule, q)) for _ in range(repeats))
            / batch
        )
    return per_image[1], per_image[8]


def http_overhead(requests: int, invariant: bool) -> tuple[float, float]:
    """Seconds per image at concurrency 1: direct pipeline calls vs POST /generate to the real `serve`
    process on loopback (a separate process, as in production: a server thread in this process would
    share its interpreter lock with the client and the direct runs)."""
    import httpx

    from tests.bench.load_test import start_server
    from tests.server.conftest import free_port
    from weights.default import load_default_pipeline

    pipe, default = load_default_pipeline(RuntimeConfig(batch_invariant=invariant))
    port = free_port()
    proc = start_server(
        port,
        max_queue=8,
        max_batch=8,
        log=Path(tempfile.mkdtemp()) / "server.log",
        extra_env={"INFINITY_BATCH_INVARIANT": str(invariant).lower()},
    )
    direct, http = [], []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            for i in range(requests):  # interleaved, so that drift hits both alike
                prompt = PROMPTS[i % len(PROMPTS)]
                direct.append(
                    _timed(lambda p=prompt, i=i: pipe.generate([p], default.schedule, [SamplingParams(seed=i)]))
                )
                http.append(
                    _timed(
                        lambda p=prompt, i=i: client.post("/generate", json={"prompt": p, "seed": i}).raise_for_status()
                    )
                )
    finally:
        proc.terminate()
        proc.wait(60)
    return statistics.median(direct), statistics.median(http)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- main -------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--sizes", help="default: tiny,mid,2b on CPU; 2b,8b on CUDA")
    p.add_argument("--pns", help="default: 0.06M,1M on CPU; 1M on CUDA")
    p.add_argument("--batches", default="1,8")
    p.add_argument(
        "--compile", help="comma list of off|default|reduce-overhead (default: off on CPU, off,reduce-overhead on CUDA)"
    )
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--max-tflop",
        type=float,
        help="skip configurations above this much work per batch (default: 150 on CPU, no limit on CUDA)",
    )
    p.add_argument("--http-requests", type=int, default=30)
    p.add_argument(
        "--batch-invariant",
        choices=["on", "off"],
        default="on",
        help="RuntimeConfig.batch_invariant for every measurement (off: one GEMM per layer)",
    )
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.sizes = args.sizes or ("2b,8b" if gpu else "tiny,mid,2b")
    args.pns = args.pns or ("1M" if gpu else "0.06M,1M")
    args.compile = args.compile or ("off,reduce-overhead" if gpu else "off")
    args.max_tflop = args.max_tflop if args.max_tflop is not None else (float("inf") if gpu else 150.0)
    name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine())
    print(
        f"# perf benchmark {time.strftime('%Y-%m-%d')}: {name}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {args.dtype}, batch_invariant {args.batch_invariant}, "
        f"template 1:1, CFG on (2 rows per image)\n"
    )

    with tempfile.TemporaryDirectory() as tmp:
        rows = speed_table(args, device, Path(tmp))
        kv_cache_table()
        if not gpu:  # host syncs, ops per block and per-scale overhead of the tiny model (dispatch_bench)
            dispatch_report()
        targets = compare(args, rows, device, gpu)
    print("\n| target | measured | wanted | met |\n|---|---|---|---|")
    for label, value, wanted, met in targets:
        print(f"| {label} | {value} | {wanted} | {'yes' if met else 'NO'} |")


def compare(args, rows: list[Row], device: torch.device, gpu: bool) -> list[tuple[str, str, str, bool]]:
    targets: list[tuple[str, str, str, bool]] = []
    for r in rows:
        if r.batch == 8 and r.compile == "off" and not gpu:
            targets.append((f"MFU {r.size} {r.pn} batch 8", f"{r.mfu:.0%}", ">= 40%", r.mfu >= 0.40))
    if gpu:
        for compile_mode in args.compile.split(","):
            one = [r for r in rows if (r.size, r.pn, r.batch, r.compile) == ("2b", "1M", 1, compile_mode)]
            eight = [r for r in rows if (r.size, r.pn, r.batch, r.compile) == ("2b", "1M", 8, compile_mode)]
            if one:
                targets.append(
                    (
                        f"2B 1024x1024 batch 1, compile {compile_mode}",
                        f"{one[0].seconds:.3f} s",
                        "<= 0.5 s",
                        one[0].seconds <= 0.5,
                    )
                )
            if one and eight:
                gain = one[0].per_image / eight[0].per_image
                targets.append(
                    (f"2B batch 8 / batch 1 throughput, compile {compile_mode}", f"{gain:.2f}x", ">= 3x", gain >= 3)
                )
    else:
        invariant = args.batch_invariant == "on"
        c = cache_and_dtype(device, args.repeats, invariant)
        print("\n| mid, 0.06M | float32 s | bfloat16 s | ratio |\n|---|---|---|---|")
        print(
            f"| KV cache (batch 1) | {c['cached float32']:.3f} | {c['cached bfloat16']:.3f} | "
            f"{c['cached float32'] / c['cached bfloat16']:.2f}x |"
        )
        print(
            f"| recompute (batch 1) | {c['recompute float32']:.3f} | {c['recompute bfloat16']:.3f} | "
            f"{c['recompute float32'] / c['recompute bfloat16']:.2f}x |"
        )
        print(
            f"| batch 8 | {c['batch8 float32']:.3f} | {c['batch8 bfloat16']:.3f} | "
            f"{c['batch8 float32'] / c['batch8 bfloat16']:.2f}x |"
        )
        cache_gain = c["recompute bfloat16"] / c["cached bfloat16"]
        bf16_gain = c["batch8 float32"] / c["batch8 bfloat16"]
        one, eight = default_model_batching(args.repeats, invariant)
        direct, http = http_overhead(args.http_requests, invariant)
        print(f"\ndefault model (end to end): {one:.4f} s/image at batch 1, {eight:.4f} at batch 8")
        print(
            f"HTTP at concurrency 1 (median of {args.http_requests}): direct {direct * 1000:.1f} ms, "
            f"POST /generate {http * 1000:.1f} ms"
        )
        targets += [
            ("KV cache vs recompute (mid bf16, batch 1)", f"{cache_gain:.2f}x", "> 1x", cache_gain > 1),
            ("bf16 vs fp32 (mid, batch 8)", f"{bf16_gain:.2f}x", ">= 2x", bf16_gain >= 2),
            ("default model batch 8 / batch 1 throughput", f"{one / eight:.2f}x", ">= 1.5x", one / eight >= 1.5),
            (
                "HTTP / direct at concurrency 1 (default model)",
                f"{http / direct:.3f}x",
                "<= 1.05x",
                http / direct <= 1.05,
            ),
        ]
    return targets


if __name__ == "__main__":
    main()
