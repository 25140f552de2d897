"""The VAE decode, reference vs fast (model/fast_decoder.py), and what it does to a whole generate().

    python -m tests.bench.decode_bench [--repeats 3] [--sizes 256,512,1024]

Random weights (speed does not depend on values; the pixel differences are those of random weights,
a worst case for rounding since nothing is saturated). One image per decode call, as served. Both
modes run interleaved in the same process, best of `repeats`; ratios are within this run.

1. Decode: the d32 decoder (Infinity-2B's VAE) at each size, and its layout at base width 32 (the
   "tiny official-format" VAE, stride 16) at 512x512: reference float32, fast float32, fast bfloat16,
   with the largest and mean pixel difference (uint8 levels) against reference float32.
2. End to end on the tiny official-format model (4 blocks, width 128, 32-bit tokens, that VAE) at
   0.25M (10 scales, 512x512), cfg 3, greedy, float32, exact attention: generate() with each decode.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.config import TRANSFORMER_SIZES, VAE_SIZES, RuntimeConfig, SamplingParams, VAEConfig
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


def decode_row(name: str, config: VAEConfig, pixels: int, repeats: int) -> None:
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
    fmax, fmean = _levels(images["fast"], images["reference"])
    bmax, bmean = _levels(images["fast-bf16"], images["reference"])
    ref, fast_s, bf16_s = seconds["reference"], seconds["fast"], seconds["fast-bf16"]
    print(
        f"| {name} | {pixels}x{pixels} | {ref:.3f} | {fast_s:.3f} | **{ref / fast_s:.2f}x** | {fmax} / {fmean:.4f} | "
        f"{bf16_s:.3f} | {ref / bf16_s:.2f}x | {bmax} / {bmean:.3f} |"
    )


def end_to_end(repeats: int, tmp: Path) -> None:
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
    results = {}
    for pipe in pipes.values():
        pipe.generate([PROMPTS[0]], schedule, params)  # warm-up
    best = {mode: (float("inf"), None) for mode in pipes}
    for _ in range(repeats):
        for mode, pipe in pipes.items():
            start = time.perf_counter()
            result = pipe.generate([PROMPTS[0]], schedule, params)
            elapsed = time.perf_counter() - start
            if elapsed < best[mode][0]:
                best[mode] = (elapsed, result.timings)
            results[mode] = result.images[0]
    diff = np.abs(results["fast"].astype(np.int16) - results["reference"].astype(np.int16))
    print("| decode | s / image | transformer s | VAE s |")
    print("|---|---|---|---|")
    for mode, (elapsed, timings) in best.items():
        print(f"| {mode} | {elapsed:.3f} | {timings.transformer:.3f} | {timings.vae_decode:.3f} |")
    ratio = best["reference"][0] / best["fast"][0]
    print(f"\nend to end, fast vs reference decode: **{ratio:.2f}x** faster; image max |diff| {diff.max()} levels")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sizes", default="256,1024", help="d32 decoder output sizes")
    args = p.parse_args()
    print(
        f"# VAE decode ({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')})\n"
    )
    print(
        "| VAE | image | reference fp32 s | fast fp32 s | speed-up | max / mean levels | "
        "fast bf16 s | speed-up | max / mean levels |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        decode_row("tiny official-format (d32 layout, base 32)", TINY_OFFICIAL_VAE, 512, args.repeats)
        for size in (int(s) for s in args.sizes.split(",")):
            decode_row("d32 (2B)", VAE_SIZES["d32"], size, 1 if size >= 1024 else args.repeats)
    print("\n# End to end: tiny official-format model, 0.25M, cfg 3, greedy, float32\n")
    with tempfile.TemporaryDirectory() as tmp:
        end_to_end(args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
