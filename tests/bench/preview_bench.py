"""Stream previews on the shipped default model: their cost and their fidelity, decoder vs fast map.

    python -m tests.bench.preview_bench [--repeats 5]

Per mode: seconds per image of generate() without previews and with every scale's preview of every row
(made in on_scale as the server's delivery makes them), best of `repeats`; then the PSNR of the fast
previews against the real decoder's previews of the same latents (mean over scales) and of the last
preview against the final image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from model.config import RuntimeConfig, SamplingParams
from model.pipeline import InfinityPipeline, ScaleEvent
from model.schedules import ScaleSchedule
from weights.default import load_default_pipeline

PROMPTS = ["a red circle", "a blue square left of a green triangle", "two yellow stars", "a big green circle"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255**2 / mse))  # inf: the same pixels


def per_image(pipe: InfinityPipeline, schedule: ScaleSchedule, previews: bool, repeats: int) -> float:
    def on_scale(event: ScaleEvent) -> None:
        pipe.preview_images(event, event.rows)

    best = float("inf")
    for r in range(repeats):
        for i, prompt in enumerate(PROMPTS):  # one image per call, as a lone request
            t0 = time.perf_counter()
            pipe.generate([prompt], schedule, SamplingParams(seed=r * 100 + i), on_scale if previews else None)
            best = min(best, time.perf_counter() - t0)
    return best


def fidelity(pipe: InfinityPipeline, schedule: ScaleSchedule) -> tuple[float, float]:
    """(mean PSNR of every preview vs the decoder's preview, PSNR of the last preview vs the final image)."""
    events: list[ScaleEvent] = []
    previews: list[np.ndarray] = []

    def on_scale(event: ScaleEvent) -> None:
        events.append(event)
        previews.append(pipe.preview_images(event, event.rows))

    params = [SamplingParams(seed=i) for i in range(len(PROMPTS))]
    result = pipe.generate(PROMPTS, schedule, params, on_scale)
    scores = [psnr(p, pipe.decode_latent(e.latent)) for p, e in zip(previews, events, strict=True)]
    last = psnr(previews[-1], np.stack(result.images))
    return float(np.mean(scores)), last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for mode in ("decoder", "fast"):
        t0 = time.perf_counter()
        pipe, default = load_default_pipeline(RuntimeConfig(preview=mode))  # type: ignore[arg-type]
        built = time.perf_counter() - t0
        assert default.schedule is not None
        plain = per_image(pipe, default.schedule, False, args.repeats)
        streamed = per_image(pipe, default.schedule, True, args.repeats)
        rows.append((mode, built, plain, streamed, *fidelity(pipe, default.schedule)))
    print(
        "| previews | pipeline built (s) | plain (ms/image) | every scale's preview (ms/image) | ratio "
        "| PSNR vs decoder previews, mean (dB) | last preview vs final image (dB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for mode, built, plain, streamed, mean_db, last_db in rows:
        print(
            f"| {mode} | {built:.2f} | {plain * 1e3:.0f} | {streamed * 1e3:.0f} | {streamed / plain:.2f}x "
            f"| {mean_db:.1f} | {last_db:.1f} |"
        )


if __name__ == "__main__":
    main()
