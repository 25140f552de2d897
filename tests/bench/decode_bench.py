"""The VAE decode, reference vs fast (model/fast_decoder.py), and what it does to a whole generate().

    python -m tests.bench.decode_bench [--repeats 3] [--sizes 256,512,1024]

Random weights (speed does not depend on values; the pixel differences are those of random weights,
a worst case for rounding since nothing is saturated). One image per decode call, as served. The
decoders run interleaved, best of `repeats`; each row and host memory mode runs in a child process of
its own, one after the other (`measure_apart`); ratios are within this run.

1. Decode: the d32 decoder (Infinity-2B's VAE) at each size, and its layout at base width 32 (the
   "tiny official-format" VAE, stride 16) at 512x512: reference and fast float32, each with glibc's
   default host memory (large blocks mmapped, returned on free: page faults on every large tensor) and
   with freed memory retained (model/host_memory.py, what `serve` does), and fast bfloat16, with the
   largest and mean pixel difference (uint8 levels) against reference float32. The speed-ups are
   against the reference on glibc's defaults: the decode as it ran before.
2. End to end on the tiny official-format model (4 blocks, width 128, 32-bit tokens, that VAE) at
   0.25M (10 scales, 512x512), cfg 3, greedy, float32, exact attention: generate() with each decode
   and host memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.config import TRANSFORMER_SIZES, VAE_SIZES, RuntimeConfig, SamplingParams, VAEConfig
from model.host_memory import retain_freed_memory
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.t5_builder import build_t5_encoder_dir
from model.text_encoder import T5TextEncoder
from model.vae import BitwiseVAE, to_uint8
from tests.bench.perf_bench import random_transformer
from tests.bench.prompts import PROMPTS

TINY_OFFICIAL_VAE = replace(VAE_SIZES["d32"], base_channels=32)
TINY_OFFICIAL = replace(TRANSFORMER_SIZES["small"], token_bits=32)


def _random_vae(config: VAEConfig, seed: int = 0) -> BitwiseVAE:
    torch.manual_seed(seed)
    return BitwiseVAE(config).eval().requires_grad_(False)


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _levels(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    diff = np.abs(to_uint8(a).numpy().astype(np.int16) - to_uint8(b).numpy().astype(np.int16))
    return int(diff.max()), float(diff.mean())


HOST_MEMORY = ("system", "retained")  # glibc's defaults (as before), then model/host_memory.py (as `serve`)


def decode_times(name: str, config: VAEConfig, pixels: int, repeats: int) -> dict:
    """Seconds per decode (best of `repeats`, the modes interleaved) and pixel differences in levels
    against reference float32."""
    reference = _random_vae(config)
    fast, fast_bf16 = copy.deepcopy(reference), copy.deepcopy(reference)
    fast.use_fast_decoder()
    fast_bf16.decoder.to(torch.bfloat16)
    fast_bf16.use_fast_decoder()
    side = pixels // config.stride
    z = torch.randn(1, config.bits, side, side, generator=torch.Generator().manual_seed(1)) * 2 / config.bits**0.5
    vaes = {"reference": reference, "fast": fast, "fast-bf16": fast_bf16}
    with torch.inference_mode():
        images = {k: v.decode(z) for k, v in vaes.items()}  # warm-up, and the pixels compared
        seconds = dict.fromkeys(vaes, float("inf"))
        for _ in range(repeats):  # interleaved: drift on a shared machine hits every mode alike
            for k, v in vaes.items():
                seconds[k] = min(seconds[k], _best(lambda v=v: v.decode(z), 1))
    levels = {k: _levels(images[k], images["reference"]) for k in ("fast", "fast-bf16")}
    return {"name": name, "pixels": pixels, "seconds": seconds, "levels": levels}


def end_to_end_times(repeats: int, tmp: Path) -> dict:
    """generate() on the tiny official-format model with each decode: seconds and stage seconds."""
    config = TINY_OFFICIAL
    t5 = build_t5_encoder_dir(
        tmp / "t5", " ".join(PROMPTS).split(), d_model=config.text_channels, num_layers=1, num_heads=2, d_ff=64
    )
    text = T5TextEncoder.from_dir(t5, torch.device("cpu"), max_length=config.text_maxlen)
    transformer, vae = random_transformer(config, torch.device("cpu")), _random_vae(TINY_OFFICIAL_VAE)
    pipes = {
        mode: InfinityPipeline(copy.deepcopy(transformer), copy.deepcopy(vae), text, RuntimeConfig(vae_decode=mode))
        for mode in ("reference", "fast")
    }
    schedule = ScaleSchedule.official(1.0, "0.25M")
    params = [SamplingParams(cfg=3.0, top_k=1, seed=0)]
    images, best = {}, {mode: [float("inf"), 0.0, 0.0] for mode in pipes}
    for pipe in pipes.values():
        pipe.generate([PROMPTS[0]], schedule, params)  # warm-up
    for _ in range(repeats):
        for mode, pipe in pipes.items():
            start = time.perf_counter()
            result = pipe.generate([PROMPTS[0]], schedule, params)
            elapsed = time.perf_counter() - start
            if elapsed < best[mode][0]:
                best[mode] = [elapsed, result.timings.transformer, result.timings.vae_decode]
            images[mode] = result.images[0]
    diff = np.abs(images["fast"].astype(np.int16) - images["reference"].astype(np.int16))
    return {"seconds": best, "max_diff": int(diff.max())}


def rows(sizes: list[int]) -> list[str]:
    return ["tiny", *(f"d32-{size}" for size in sizes), "end-to-end"]


def measure(host_memory: str, row: str, repeats: int) -> dict:
    """One row's figures, in this process, with its host memory set to `host_memory` first."""
    if host_memory == "retained":
        retain_freed_memory()
    if row == "tiny":
        return decode_times("tiny official-format (d32 layout, base 32)", TINY_OFFICIAL_VAE, 512, repeats)
    if row.startswith("d32-"):
        size = int(row.removeprefix("d32-"))
        return decode_times("d32 (2B)", VAE_SIZES["d32"], size, 1 if size >= 1024 else repeats)
    with tempfile.TemporaryDirectory() as tmp:
        return end_to_end_times(repeats, Path(tmp))


def measure_apart(sizes: list[int], repeats: int) -> dict[str, dict[str, dict]]:
    """`measure` each row once per host memory mode, each in a fresh process: with glibc's defaults
    what faults depends on the heap's history (what earlier work grew it to), and the setting is a
    process's for good. A fresh process per row is what a server doing one kind of work sees."""
    runs: dict[str, dict[str, dict]] = {mode: {} for mode in HOST_MEMORY}
    for row in rows(sizes):
        for mode in HOST_MEMORY:
            command = [sys.executable, "-m", "tests.bench.decode_bench", "--host-memory", mode, "--row", row]
            out = subprocess.run([*command, "--repeats", str(repeats)], capture_output=True, text=True, check=True)
            runs[mode][row] = json.loads(out.stdout.strip().splitlines()[-1])
    return runs


def print_tables(runs: dict[str, dict]) -> None:
    print(
        "| VAE | image | reference fp32, system memory s | reference, retained s | fast, system s | "
        "fast fp32, retained s | speed-up | max / mean levels | fast bf16, retained s | speed-up | max / mean levels |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    decodes = [row for row in runs["system"] if row != "end-to-end"]
    for system, retained in ((runs["system"][row], runs["retained"][row]) for row in decodes):
        before, after, bf16 = (
            system["seconds"]["reference"],
            retained["seconds"]["fast"],
            retained["seconds"]["fast-bf16"],
        )
        (fmax, fmean), (bmax, bmean) = retained["levels"]["fast"], retained["levels"]["fast-bf16"]
        print(
            f"| {system['name']} | {system['pixels']}x{system['pixels']} | {before:.3f} | "
            f"{retained['seconds']['reference']:.3f} | {system['seconds']['fast']:.3f} | {after:.3f} | "
            f"**{before / after:.2f}x** | {fmax} / {fmean:.4f} | "
            f"{bf16:.3f} | {before / bf16:.2f}x | {bmax} / {bmean:.3f} |"
        )
    print("\n# End to end: tiny official-format model, 0.25M, cfg 3, greedy, float32\n")
    print("| decode | host memory | s / image | transformer s | VAE s |")
    print("|---|---|---|---|---|")
    for mode in HOST_MEMORY:
        for decoder, (elapsed, transformer, vae) in runs[mode]["end-to-end"]["seconds"].items():
            print(f"| {decoder} | {mode} | {elapsed:.3f} | {transformer:.3f} | {vae:.3f} |")
    before = runs["system"]["end-to-end"]["seconds"]["reference"][0]
    after = runs["retained"]["end-to-end"]["seconds"]["fast"][0]
    print(
        f"\nend to end, fast decode with retained memory vs reference on glibc's defaults: **{before / after:.2f}x** "
        f"faster; image max |diff| {runs['retained']['end-to-end']['max_diff']} levels"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", default="256,1024", help="d32 decoder output sizes")
    p.add_argument("--host-memory", choices=HOST_MEMORY, help="with --row: measure in this process, print JSON")
    p.add_argument("--row", help="tiny, d32-SIZE or end-to-end")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.host_memory and args.row:
        print(json.dumps(measure(args.host_memory, args.row, args.repeats)))
        return
    print(
        f"# VAE decode ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}); each host memory mode in its own process\n"
    )
    print_tables(measure_apart(sizes, args.repeats))


if __name__ == "__main__":
    main()
