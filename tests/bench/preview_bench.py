"""Stream previews on the shipped default model: their cost and their fidelity, per way of making them.

    python -m tests.bench.preview_bench [--repeats 5] [--threads 2]

Ways: "decoder" (the real decoder per preview), "linear" ("fast" without a trained preview decoder: the
map fitted at load) and "learned" ("fast" with weights/default/preview_decoder.safetensors). Per way:
- cost: seconds per image of generate() without previews and with every scale's preview of every row
  (made in on_scale as the server's delivery makes them), one image per call, best of `repeats`;
- batch-mates: a batch of 4 where one row streams every preview vs none does, best of `repeats`: the
  other rows finish with the batch, so its time is theirs;
- fidelity, on 8 prompts: PSNR of every scale's preview against the real decoder's image of the same
  latent (the last one is the final image), beside two flat baselines: the best single colour per
  scale (the mean over the batch) and each image's own mean colour (an oracle no preview can know).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from model.config import RuntimeConfig, SamplingParams
from model.pipeline import InfinityPipeline, ScaleEvent
from model.schedules import ScaleSchedule
from weights.default import DEFAULT_DIR, load_default_pipeline
from weights.pipeline import load_pipeline
from weights.preview import PREVIEW_FILE

PROMPTS = ["a red circle", "a blue square left of a green triangle", "two yellow stars", "a big green circle"]
MORE = ["three pink stars", "a cyan triangle above a white circle", "a small orange square", "four lime circles"]
WAYS = ("decoder", "linear", "learned")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))  # inf: the same pixels


def db(value: float) -> str:
    return "exact" if value == float("inf") else f"{value:.1f}"


def build(way: str) -> InfinityPipeline:
    root = DEFAULT_DIR
    files = (root / "transformer.safetensors", root / "vae.safetensors", root / "text_encoder")
    runtime = RuntimeConfig(preview="decoder" if way == "decoder" else "fast")
    return load_pipeline(*files, runtime, root / PREVIEW_FILE if way == "learned" else None)


def best_pair(run: Callable[[bool], object], repeats: int) -> tuple[float, float]:
    """Best seconds of run(False) and run(True), interleaved so that load on a shared CPU hits both."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for streamed in (False, True):
            t0 = time.perf_counter()
            run(streamed)
            best[streamed] = min(best[streamed], time.perf_counter() - t0)
    return best[0], best[1]


def cost(pipe: InfinityPipeline, schedule: ScaleSchedule, repeats: int) -> tuple[float, float]:
    """(plain, every scale's preview) seconds per image, one image per call."""

    def on_scale(event: ScaleEvent) -> None:
        pipe.preview_images(event, event.rows)

    def run(streamed: bool) -> None:
        for i, prompt in enumerate(PROMPTS):  # one image per call, as a lone request
            pipe.generate([prompt], schedule, SamplingParams(seed=i), on_scale if streamed else None)

    plain, streamed = best_pair(run, repeats)
    return plain / len(PROMPTS), streamed / len(PROMPTS)


def batch_mates(pipe: InfinityPipeline, schedule: ScaleSchedule, repeats: int) -> tuple[float, float]:
    """(batch of 4 with no previews, the same batch with row 0 streaming every preview) seconds."""

    def on_scale(event: ScaleEvent) -> None:
        pipe.preview_images(event, [0])

    params = [SamplingParams(seed=i) for i in range(len(PROMPTS))]
    return best_pair(lambda streamed: pipe.generate(PROMPTS, schedule, params, on_scale if streamed else None), repeats)


def fidelity(pipe: InfinityPipeline, schedule: ScaleSchedule) -> tuple[list[float], list[float], list[float]]:
    """Per scale: PSNR of the previews, of the best flat colour and of each image's own mean colour, all
    against the real decoder's image of the same latent (at the last scale: the final image)."""
    events: list[ScaleEvent] = []
    previews: list[np.ndarray] = []

    def on_scale(event: ScaleEvent) -> None:
        events.append(event)
        previews.append(pipe.preview_images(event, event.rows))

    prompts = PROMPTS + MORE
    result = pipe.generate(prompts, schedule, [SamplingParams(seed=i) for i in range(len(prompts))], on_scale)
    real = [pipe.decode_latent(e.latent) for e in events]
    assert np.array_equal(real[-1], np.stack(result.images))
    scores = [psnr(p, r) for p, r in zip(previews, real, strict=True)]
    flat = [psnr(np.broadcast_to(r.mean(axis=(0, 1, 2), keepdims=True), r.shape), r) for r in real]
    own = [psnr(np.broadcast_to(r.mean(axis=(1, 2), keepdims=True), r.shape), r) for r in real]
    return scores, flat, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="1 on a CPU shared with other work")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    schedule = load_default_pipeline(RuntimeConfig())[1].schedule
    assert schedule is not None
    rows, per_scale = [], {}
    for way in WAYS:
        t0 = time.perf_counter()
        pipe = build(way)
        built = time.perf_counter() - t0
        plain, streamed = cost(pipe, schedule, args.repeats)
        alone, mates = batch_mates(pipe, schedule, args.repeats)
        scores, flat, own = fidelity(pipe, schedule)
        per_scale[way] = scores
        rows.append((way, built, plain, streamed, alone, mates, scores))
    per_scale["flat colour (best)"], per_scale["flat colour (own mean, oracle)"] = flat, own
    print(
        "| previews | pipeline built (s) | plain (ms/image) | every scale's preview (ms/image) | ratio "
        "| batch of 4, one row streams: ratio | PSNR mean over scales (dB) | last preview vs final image (dB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for way, built, plain, streamed, alone, mates, scores in rows:
        print(
            f"| {way} | {built:.2f} | {plain * 1e3:.0f} | {streamed * 1e3:.0f} | {streamed / plain:.2f}x "
            f"| {mates / alone:.2f}x | {db(float(np.mean(scores)))} | {db(scores[-1])} |"
        )
    for name in ("flat colour (best)", "flat colour (own mean, oracle)"):
        print(f"| {name} | | | | | | {np.mean(per_scale[name]):.1f} | {per_scale[name][-1]:.1f} |")
    print()
    print("| PSNR per scale (dB) | " + " | ".join(f"{h}x{w}" for h, w in schedule.scales) + " |")
    print("|---|" + "---|" * schedule.num_scales)
    for name, scores in per_scale.items():
        print(f"| {name} | " + " | ".join(db(s) for s in scores) + " |")


if __name__ == "__main__":
    main()
