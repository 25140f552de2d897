"""Transformer sampling benchmark on this machine: prints tables of times and ratios from one run.

    python -m tests.bench.model_bench [--device cpu] [--pn 0.06M] [--repeats 2] [--attention sdpa]

Random weights (speed does not depend on values) and random text features; the VAE and T5 are
left out so that the numbers are the sampler's. Ratios are measured within the same run.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass

import torch

from model.attention import Backend, TextMemory
from model.config import ATTENTION_CHOICES, TRANSFORMER_SIZES, VAE_SIZES, SamplingParams, TransformerConfig, VAEConfig
from model.quantizer import BitwiseQuantizer
from model.sampler import sample
from model.schedules import ScaleSchedule
from model.transformer import Infinity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VAE_FOR_BITS = {
    8: VAE_SIZES["tiny"],
    16: VAEConfig(bits=16, base_channels=32, channel_mult=(1, 2)),
    32: VAE_SIZES["d32"],
}


@dataclass
class Setup:
    model: Infinity
    quantizer: BitwiseQuantizer
    device: torch.device
    backend: Backend


def build(name: str, dtype: str, device: torch.device, invariant: bool = True, backend: Backend = "sdpa") -> Setup:
    """The model as a pipeline runs it: blocks in `dtype`, batch invariance as RuntimeConfig (on by default)."""
    config: TransformerConfig = TRANSFORMER_SIZES[name]
    model = Infinity(config).to(device).eval().requires_grad_(False).set_batch_invariant(invariant)
    model.blocks.to(DTYPES[dtype])
    return Setup(model, BitwiseQuantizer(VAE_FOR_BITS[config.token_bits]), device, backend)


def text(setup: Setup, batch: int) -> TextMemory:
    c = setup.model.config
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, 12, c.text_channels, generator=g).to(setup.device)
    return TextMemory(feats, torch.full((batch,), 12, device=setup.device))


def run_cached(setup: Setup, schedule: ScaleSchedule, batch: int, cfg: float | tuple[float, ...] = 3.0) -> list[float]:
    memory = text(setup, batch)
    params = [SamplingParams(cfg=cfg, tau=0.5, seed=i) for i in range(batch)]
    gens = [torch.Generator(setup.device).manual_seed(i) for i in range(batch)]
    with torch.inference_mode():
        out = sample(
            setup.model,
            setup.quantizer,
            schedule,
            memory,
            setup.model.unconditional_text(memory.lengths),
            params,
            gens,
            setup.backend,
        )
    return out.scale_seconds


def run_recompute(setup: Setup, schedule: ScaleSchedule, batch: int) -> float:
    """No KV cache: every scale re-runs the whole prefix under the block-causal mask (with CFG rows)."""
    model, memory = setup.model, text(setup, 2 * batch)
    t0 = time.perf_counter()
    with torch.inference_mode():
        cond = model.condition(memory, setup.backend)
        for si in range(schedule.num_scales):
            prefix = ScaleSchedule(schedule.h_div_w, schedule.pn, schedule.scales[: si + 1])
            inputs = torch.zeros(2 * batch, prefix.total_tokens - 1, model.config.token_bits, device=setup.device)
            model(cond, prefix, inputs, setup.backend)
    return time.perf_counter() - t0


def best_of(repeats: int, fn):
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: sum(r) if isinstance(r, list) else r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pn", default="0.06M")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of " + ", ".join(DTYPES))
    parser.add_argument(
        "--attention",
        choices=[c for c in ATTENTION_CHOICES if c != "auto"],
        default="sdpa",
        help="cross-attention kernel (model.config.ATTENTION_MODES)",
    )
    args = parser.parse_args()
    device, schedule = torch.device(args.device), ScaleSchedule.official(1.0, args.pn)
    sizes, batches = args.sizes.split(","), [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    print(
        f"# sampler benchmark: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {device}, template 1.0 pn {args.pn} "
        f"({schedule.num_scales} scales, {schedule.total_tokens} tokens), cfg on (2 rows per image), "
        f"attention {args.attention}\n"
    )

    per_scale: dict[str, list[float]] = {}
    print("| size | dtype | batch | s / image | images / s | vs batch 1 |")
    print("|---|---|---|---|---|---|")
    totals: dict[tuple[str, str, int], float] = {}
    for name in sizes:
        for dtype in dtypes:
            setup = build(name, dtype, device, backend=args.attention)
            run_cached(setup, schedule, 1)  # warm-up
            for b in batches:
                secs = best_of(args.repeats, lambda setup=setup, b=b: run_cached(setup, schedule, b))
                totals[(name, dtype, b)] = sum(secs)
                if b == 1:
                    per_scale[f"{name} {dtype}"] = secs
                base = totals[(name, dtype, batches[0])] / batches[0]
                per_image = sum(secs) / b
                print(f"| {name} | {dtype} | {b} | {per_image:.4f} | {1 / per_image:.2f} | {base / per_image:.2f}x |")

    print("\n| per-scale ms (batch 1) | " + " | ".join(f"{h}x{w}" for h, w in schedule.scales) + " |")
    print("|---|" + "---|" * schedule.num_scales)
    for label, secs in per_scale.items():
        print(f"| {label} | " + " | ".join(f"{1000 * s:.1f}" for s in secs) + " |")

    print("\n| size | dtype | bf16 speed-up (batch 8) | KV-cached s | recompute s | cached speed-up |")
    print("|---|---|---|---|---|---|")
    for name in sizes:
        for dtype in dtypes:
            setup = build(name, dtype, device, backend=args.attention)
            cached = sum(best_of(args.repeats, lambda setup=setup: run_cached(setup, schedule, 1)))
            recompute = best_of(args.repeats, lambda setup=setup: run_recompute(setup, schedule, 1))
            b8 = max(batches)
            fp32 = totals.get((name, "float32", b8))
            speedup = f"{fp32 / totals[(name, dtype, b8)]:.2f}x" if fp32 else "-"
            print(f"| {name} | {dtype} | {speedup} | {cached:.3f} | {recompute:.3f} | {recompute / cached:.2f}x |")


if __name__ == "__main__":
    main()
