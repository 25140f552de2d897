"""Guidance only where it matters: what dropping the unconditional rows saves once cfg is 1 for the rest.

    python -m tests.bench.guidance_bench [--size mid] [--pn 0.25M] [--dtype bfloat16] [--repeats 3]

Counted FLOPs (tests/bench/flops.py, checked against torch's FlopCounterMode on the real sampler in
tests/bench/test_flops.py) for the 2B and 8B shapes at 1M, then sampler seconds per image timed in one
run on this machine (random weights: speed does not depend on values), with cfg 3 on every scale
against cfg 3 followed by cfg 1 on the last k scales.
"""

from __future__ import annotations

import argparse

import torch

from model.config import TRANSFORMER_SIZES
from model.schedules import ScaleSchedule
from tests.bench.flops import image_flops
from tests.bench.model_bench import best_of, build, run_cached

TEXT_TOKENS = 64
LAST = (0, 1, 2, 3, 4)  # scales at the end with cfg 1 (0: guidance everywhere)


def flops_table() -> None:
    schedule = ScaleSchedule.official(1.0, "1M")
    n = schedule.num_scales
    print(
        f"| shape, 1M ({n} scales), {TEXT_TOKENS} text tokens | "
        + " | ".join(f"cfg 1 on last {k}" for k in LAST)
        + " |"
    )
    print("|---|" + "---|" * len(LAST))
    for name in ("2b", "8b"):
        config = TRANSFORMER_SIZES[name]
        full = image_flops(config, schedule, TEXT_TOKENS)
        cells = []
        for k in LAST:
            flops = image_flops(config, schedule, TEXT_TOKENS, guided_scales=n - k)
            cells.append(f"{flops / 1e12:.1f} TFLOP ({full / flops:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")


def time_table(size: str, pn: str, dtype: str, repeats: int) -> None:
    schedule = ScaleSchedule.official(1.0, pn)
    n = schedule.num_scales
    setup = build(size, dtype, torch.device("cpu"))
    run_cached(setup, schedule, 1)  # warm-up
    seconds = {}
    for k in LAST:
        cfg = (3.0,) * (n - k) + (1.0,) * k
        seconds[k] = sum(best_of(repeats, lambda cfg=cfg: run_cached(setup, schedule, 1, cfg)))
    print(f"\n| {size}, {pn} ({n} scales), {dtype}, batch 1 | " + " | ".join(f"cfg 1 on last {k}" for k in LAST) + " |")
    print("|---|" + "---|" * len(LAST))
    print(
        "| sampler s / image | " + " | ".join(f"{seconds[k]:.3f} ({seconds[0] / seconds[k]:.2f}x)" for k in LAST) + " |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="mid")
    parser.add_argument("--pn", default="0.25M")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    flops_table()
    time_table(args.size, args.pn, args.dtype, args.repeats)


if __name__ == "__main__":
    main()
