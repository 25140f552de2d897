"""model/preview.py: the fitted linear preview map, and the pipeline's previews with it."""

import copy

import numpy as np
import pytest
import torch

from model.config import RuntimeConfig, SamplingParams
from model.pipeline import InfinityPipeline, ScaleEvent
from model.preview import LinearPreview
from model.schedules import ScaleSchedule
from model.text_encoder import T5TextEncoder
from weights.default import DEFAULT_DIR, default_files_present, load_default_pipeline

SCHEDULE = ScaleSchedule.official(1.0, "0.06M")
PROMPTS = ["a red circle", "a blue square left of a green triangle", "two yellow stars", "a big green circle"]


def _pipe(t5_dir, transformer, vae, preview: str) -> InfinityPipeline:
    runtime = RuntimeConfig(preview=preview)  # type: ignore[arg-type]
    return InfinityPipeline(copy.deepcopy(transformer), copy.deepcopy(vae), T5TextEncoder.from_dir(t5_dir), runtime)


def _run(pipe: InfinityPipeline, prompts: list[str], schedule: ScaleSchedule):
    """generate() with every scale's preview of every row made, as a streaming request's batch does."""
    events: list[ScaleEvent] = []
    previews: list[np.ndarray] = []

    def on_scale(event: ScaleEvent) -> None:
        events.append(event)
        previews.append(pipe.preview_images(event, event.rows))

    seeds = [SamplingParams(seed=i) for i in range(len(prompts))]
    return pipe.generate(prompts, schedule, seeds, on_scale=on_scale), events, previews


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255**2 / mse)


def test_previews_have_the_final_images_size_and_dtype(t5_dir, tiny_transformer, tiny_vae):
    pipe = _pipe(t5_dir, tiny_transformer, tiny_vae, "fast")
    result, events, previews = _run(pipe, PROMPTS[:2], SCHEDULE)
    height, width = pipe.image_size(SCHEDULE)
    assert [p.shape for p in previews] == [(2, height, width, 3)] * SCHEDULE.num_scales
    assert all(p.dtype == np.uint8 for p in previews)
    assert pipe.preview_images(events[-1], [1, 7]).shape == (1, height, width, 3)  # row 7 is not running
    assert pipe.preview_images(events[-1], []).shape == (0, height, width, 3)
    assert pipe.fast_preview is not None
    raw = pipe.fast_preview(events[-1].latent)  # (B, 3, H, W) in [-1, 1]
    assert raw.shape == (2, 3, height, width) and raw.dtype == torch.float32 and raw.abs().max() <= 1


def test_a_rows_preview_does_not_depend_on_its_batch(t5_dir, tiny_transformer, tiny_vae):
    pipe = _pipe(t5_dir, tiny_transformer, tiny_vae, "fast")
    _, events, together = _run(pipe, PROMPTS[:3], SCHEDULE)
    for event, batch in zip(events, together, strict=True):  # row 1 previewed alone, and in a batch of 3
        single = ScaleEvent(event.scale_index, event.num_scales, (1,), event.latent[1:2], event.seconds)
        assert np.array_equal(pipe.preview_images(single, [1])[0], batch[1])
        assert np.array_equal(pipe.preview_images(event, [1])[0], batch[1])


def test_the_fit_is_deterministic(t5_dir, tiny_transformer, tiny_vae):
    first = _pipe(t5_dir, tiny_transformer, tiny_vae, "fast").fast_preview
    again = _pipe(t5_dir, tiny_transformer, tiny_vae, "fast").fast_preview
    assert first is not None and again is not None
    assert torch.equal(first.weight, again.weight) and torch.equal(first.bias, again.bias)
    other_seed = LinearPreview.fit(copy.deepcopy(tiny_vae).requires_grad_(False), seed=1)
    assert not torch.equal(first.weight, other_seed.weight)  # the seed is what fixes it


def test_final_images_and_bits_are_untouched_and_decoder_previews_stay_exact(t5_dir, tiny_transformer, tiny_vae):
    fast = _pipe(t5_dir, tiny_transformer, tiny_vae, "fast")
    decoder = _pipe(t5_dir, tiny_transformer, tiny_vae, "decoder")
    assert decoder.fast_preview is None
    plain = fast.generate(PROMPTS[:2], SCHEDULE, [SamplingParams(seed=0), SamplingParams(seed=1)])
    with_fast, _, fast_previews = _run(fast, PROMPTS[:2], SCHEDULE)
    with_decoder, events, decoder_previews = _run(decoder, PROMPTS[:2], SCHEDULE)
    for result in (with_fast, with_decoder):
        assert all(np.array_equal(a, b) for a, b in zip(plain.images, result.images, strict=True))
        assert all(np.array_equal(a, b) for a, b in zip(plain.bits, result.bits, strict=True))
    assert np.array_equal(decoder_previews[-1], np.stack(plain.images))  # "decoder": the last preview is the image
    assert np.array_equal(decoder_previews[-1], decoder.decode_latent(events[-1].latent))
    assert not np.array_equal(fast_previews[-1], decoder_previews[-1])  # "fast" approximates it


@pytest.mark.skipif(not default_files_present(DEFAULT_DIR), reason="the default model is not shipped here")
def test_on_the_default_model_fast_previews_stay_near_the_decoders():
    """Fast vs the real decoder's previews of the same latents, every scale of 4 prompts. Measured on
    2026-11-30: mean 20.0 dB over the scales, 17.5 dB for the last preview vs the final image. Known
    shortfall (why "decoder" stays the default): a flat preview of the map's bias alone scores more,
    24.6 dB and 18.7 dB, as the fit's random-bit latents are off the sampler's distribution (a map fitted
    on sampled latents reaches 36.6 dB at the first scale and 20.7 dB at the last). The bars leave ~1.5 dB."""
    pipe, default = load_default_pipeline(RuntimeConfig(preview="fast"))
    assert pipe.fast_preview is not None and default.schedule is not None
    result, events, fast = _run(pipe, PROMPTS, default.schedule)
    real = [pipe.decode_latent(e.latent) for e in events]
    scores = [psnr(f, r) for f, r in zip(fast, real, strict=True)]
    last = psnr(fast[-1], np.stack(result.images))
    assert np.mean(scores) > 18.5 and last > 16, (scores, last)
