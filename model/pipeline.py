"""Prompts -> RGB images: text encoder, bitwise sampler, VAE decoder.

Devices and dtypes come from a RuntimeConfig. Following the official bf16 run, a low-precision
dtype applies to the transformer blocks and the VAE decoder, while the text projections, the
AdaLN projections, the embeddings and the head stay float32.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from model.attention import TextMemory, choose_backend, stack_memories
from model.config import ATTENTION_MODES, PRECISIONS, RuntimeConfig, SamplingParams
from model.cpu_threads import BuildingThread
from model.image_condition import PASTE_FEATHER, ImageCondition, feathered_paste, prepare
from model.memory import MemoryUsage, device_memory
from model.preview import LinearPreview, PreviewDecoder, Previewer
from model.sampler import SampleOutput, Sampling, ScaleCallback, ScaleEvent
from model.schedules import ScaleSchedule
from model.text_encoder import EncodedText, T5TextEncoder
from model.transformer import Infinity
from model.vae import BitwiseVAE, to_uint8

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "DeviceOutOfMemory",
    "Generation",
    "GenerationResult",
    "InfinityPipeline",
    "ScaleEvent",
    "StageTimings",
]

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in PRECISIONS}  # torch spells them alike


@dataclass(frozen=True)
class StageTimings:
    text_encode: float
    transformer: float
    vae_decode: float
    scales: tuple[float, ...]  # transformer seconds per scale
    image_encode: float = 0.0  # image-to-image: encoding the input images into bits


@dataclass(frozen=True)
class GenerationResult:
    rows: tuple[int, ...]  # prompt index of each returned image (rows dropped by on_scale are absent)
    nonfinite: tuple[int, ...]  # prompt indices whose logits went non-finite (extreme cfg/tau): no image
    images: list[np.ndarray]  # per returned row (H, W, 3) uint8 RGB
    bits: list[np.ndarray]  # per scale (B, h, w, d) uint8, latent layout (bit c = channel c)
    seeds: list[int]
    prompt_tokens: list[int]  # T5 tokens per prompt, EOS included
    image_tokens: int  # bitwise tokens generated per image: sum over scales of h*w*bits
    timings: StageTimings

    @staticmethod
    def combine(parts: Sequence[GenerationResult]) -> GenerationResult:
        """One batch's result from the parts `Generation.finish(rows)` returned (disjoint rows): rows in
        the order of the parts, decode seconds summed, the rest the batch's own."""
        first = parts[0]
        timings = replace(first.timings, vae_decode=sum(p.timings.vae_decode for p in parts))
        per_scale = zip(*(p.bits for p in parts), strict=True)
        return replace(
            first,
            rows=tuple(r for p in parts for r in p.rows),
            nonfinite=tuple(r for p in parts for r in p.nonfinite),
            images=[image for p in parts for image in p.images],
            bits=[np.concatenate(scale) for scale in per_scale],
            seeds=[s for p in parts for s in p.seeds],
            prompt_tokens=[n for p in parts for n in p.prompt_tokens],
            timings=timings,
        )


class DeviceOutOfMemory(RuntimeError):
    """The device ran out of memory for this batch (a smaller batch may fit)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class InfinityPipeline:
    def __init__(
        self,
        transformer: Infinity,
        vae: BitwiseVAE,
        text_encoder: T5TextEncoder,
        runtime: RuntimeConfig = RuntimeConfig(),
        preview_decoder: PreviewDecoder | None = None,
    ) -> None:
        """preview_decoder: a trained one for this VAE (model/preview.py), used when `runtime.preview` is
        "fast"; without one, "fast" fits a linear map from the VAE decoder."""
        if transformer.config.token_bits != vae.config.token_bits:
            raise ValueError(
                f"transformer tokens have {transformer.config.token_bits} bits, the VAE makes "
                f"{vae.config.token_bits}-bit tokens"
            )
        if text_encoder.channels != transformer.config.text_channels:
            raise ValueError(
                f"text encoder width {text_encoder.channels} != transformer text_channels "
                f"{transformer.config.text_channels}"
            )
        self.runtime = runtime
        self.device = torch.device(runtime.device)
        self._built_on = BuildingThread(self.device)  # warns once if run elsewhere while it lives
        dtype = DTYPES[runtime.dtype]
        self.transformer = transformer.to(self.device).eval().requires_grad_(False)
        self.transformer.blocks.to(dtype)
        self.transformer.set_batch_invariant(runtime.batch_invariant)  # this model's own, not the process's
        if runtime.compile != "off":
            for block in self.transformer.blocks:
                block.compile(mode=runtime.compile, dynamic=True)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.vae.decoder.to(dtype)
        # after the dtype and device: the fast decoder folds copies of the weights
        self.vae.use_fast_decoder(runtime.vae_decode == "fast")
        self.fast_preview = self._fast_preview(runtime, preview_decoder)  # None: previews are full decodes
        self.text_encoder = text_encoder
        self.backend = choose_backend(runtime.attention, self.device)
        log.info(
            "pipeline on %s: blocks and VAE decoder in %s, batch-invariant %s, attention %s: %s; previews %s%s",
            self.device,
            runtime.dtype,
            "on" if runtime.batch_invariant else "off",
            self.backend,
            ATTENTION_MODES[self.backend],
            runtime.preview,
            "" if self.fast_preview is None else f" ({type(self.fast_preview).__name__})",
        )

    # ---- public API -------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str],
        schedule: ScaleSchedule,
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        on_scale: ScaleCallback | None = None,
        images: Sequence[ImageCondition | None] | None = None,
    ) -> GenerationResult:
        """One image per prompt; `params` is shared or one per prompt (seeds, cfg, tau, ...).

        images: per prompt, an input image to vary or edit (model/image_condition.py), or None. A row
        with an image may have an empty prompt: it is then sampled under the unconditional text alone."""
        generation = self.start(prompts, schedule, params, images)
        while not generation.done:
            generation.step(on_scale)
        return generation.finish()

    def start(
        self,
        prompts: Sequence[str],
        schedule: ScaleSchedule,
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        images: Sequence[ImageCondition | None] | None = None,
    ) -> Generation:
        """`generate` a scale at a time: encode the text and input images now, then `step()` until
        `done`, then `finish()`. Between two steps the caller may step other generations (continuous
        batching): a generation's images do not depend on that."""
        rows = self._check_inputs(prompts, schedule, params, images)
        self._built_on.check()
        # one generator per row, seeded explicitly
        seeds = [p.seed if p.seed is not None else random.SystemRandom().randrange(2**32) for p in rows]
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        conditions = list(images or [None] * len(rows))
        with self._out_of_memory(len(rows)), torch.inference_mode():
            t0 = time.perf_counter()
            encoded = self.text_encoder.encode(list(prompts))
            uncond = self._unconditional(encoded.memory, rows)
            encoded = self._unprompted(encoded, uncond, prompts)
            _sync(self.device)
            t1 = time.perf_counter()
            # image-to-image: the input images' bits, and which of them each row forces. Encoded once
            # per distinct condition: `n` images of one request share theirs.
            vae_scales = schedule.vae_scales(self.vae.config.spatial_patchify)
            prepared = {id(c): prepare(c, self.vae, vae_scales, schedule.num_scales) for c in conditions if c}
            forced = [None if c is None else prepared[id(c)] for c in conditions]  # ImageCondition is truthy
            t2 = time.perf_counter()
            sampling = Sampling(
                self.transformer,
                self.vae.quantizer,
                schedule,
                encoded.memory,
                uncond,
                rows,
                generators,
                self.backend,
                forced,
            )
            setup = time.perf_counter() - t2  # conditioning and text K/V: the transformer's stage
        generation = Generation(self, schedule, seeds, encoded.token_counts, conditions, sampling, t1 - t0, t2 - t1)
        generation.transformer_seconds = setup
        return generation

    def image_size(self, schedule: ScaleSchedule) -> tuple[int, int]:
        """(height, width) in pixels that this VAE produces for the schedule."""
        return schedule.image_size(self.vae.config.pixels_per_token)

    @torch.inference_mode()
    def decode_latent(self, latent: torch.Tensor) -> np.ndarray:
        """Accumulated codes (B, d, h, w) -> (B, H, W, 3) uint8 RGB (also used for previews).

        One image at a time: convolution kernels round differently at other batch sizes, and an
        image must not depend on what else shares its batch.
        """
        latent = latent.to(self.device)
        images = np.stack([to_uint8(self.vae.decode(latent[i : i + 1]))[0].cpu().numpy() for i in range(len(latent))])
        _sync(self.device)
        return images

    @torch.inference_mode()
    def preview_images(self, event: ScaleEvent, rows: Sequence[int]) -> np.ndarray:
        """(N, H, W, 3) uint8 images of these rows (prompt indices, as in `generate`) as they stand at
        `event`'s scale; rows no longer running are left out. For streamed previews, from `on_scale`.

        With `RuntimeConfig.preview` "fast", a trained preview decoder or a fitted linear map, not the
        real decoder: the last scale's preview then approximates the final image (PSNR in
        docs/benchmarks.md), it is not that image."""
        positions = [event.rows.index(r) for r in rows if r in event.rows]
        if self.fast_preview is None:
            return self.decode_latent(event.latent[positions])
        return to_uint8(self.fast_preview.preview(event.latent[positions].to(self.device))).cpu().numpy()

    def memory_bytes(self) -> MemoryUsage:
        """Now and at the peak: allocated/reserved on CUDA, the process's resident set on CPU."""
        return device_memory(self.device)

    def text_cache_stats(self) -> dict[str, int]:
        """The text-feature cache: lookups that hit and missed since start, entries and bytes held."""
        cache = self.text_encoder.cache
        return {"hits": cache.hits, "misses": cache.misses, "entries": len(cache), "bytes": cache.bytes}

    def kv_cache_bytes_per_image(self, schedule: ScaleSchedule, guided: bool = True) -> int:
        from model.kv_cache import KVCache

        c = self.transformer.config
        per_row = KVCache.bytes_per_row(
            c.depth, c.num_heads, schedule.total_tokens, c.head_dim, self.transformer.blocks_dtype
        )
        return per_row * (2 if guided else 1)

    # ---- steps ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _out_of_memory(self, rows: int) -> Iterator[None]:
        """torch's out-of-memory error as DeviceOutOfMemory (the server retries smaller batches)."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise DeviceOutOfMemory(f"out of memory on {self.device} for {rows} images") from e

    def _fast_preview(self, runtime: RuntimeConfig, decoder: PreviewDecoder | None) -> Previewer | None:
        """The trained preview decoder if given (float32 on this device: it is tiny, and float32 keeps
        its previews the same on every device); without one, "fast" fits a linear map from this
        pipeline's own decoder, in its dtype, and "auto" previews with the real decoder (None)."""
        if runtime.preview == "decoder" or (runtime.preview == "auto" and decoder is None):
            return None
        if decoder is None:
            return LinearPreview.fit(self.vae)
        if (decoder.config.bits, decoder.config.stride) != (self.vae.config.bits, self.vae.config.stride):
            raise ValueError(
                f"`preview_decoder` is for {decoder.config.bits}-bit latents at stride {decoder.config.stride}, "
                f"the VAE has {self.vae.config.bits} bits at stride {self.vae.config.stride}"
            )
        return decoder.to(self.device, torch.float32).eval().requires_grad_(False)

    def _check_inputs(
        self,
        prompts: Sequence[str],
        schedule: ScaleSchedule,
        params: SamplingParams | Sequence[SamplingParams],
        images: Sequence[ImageCondition | None] | None,
    ) -> list[SamplingParams]:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("`prompts` must be a non-empty list of strings")
        rows = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(rows) != len(prompts):
            raise ValueError(f"`params` has {len(rows)} entries for {len(prompts)} prompts")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"`images` has {len(images)} entries for {len(prompts)} prompts")
        for i, prompt in enumerate(prompts):
            if not prompt and (images is None or images[i] is None):
                raise ValueError("`prompts` may be empty only for a row with an input image")
        if schedule.num_scales > self.transformer.config.num_levels:
            raise ValueError(
                f"schedule has {schedule.num_scales} scales, the model knows {self.transformer.config.num_levels}"
            )
        for p in rows:  # the one check of per-scale lists for Python callers
            p.check_scales(schedule.num_scales)
        return [p.for_schedule(schedule.num_scales) for p in rows]

    @staticmethod
    def _unprompted(encoded: EncodedText, uncond: TextMemory, prompts: Sequence[str]) -> EncodedText:
        """Rows without a prompt (image variations) are conditioned on their unconditional text, so
        guidance mixes two equal predictions and the image alone steers them."""
        empty = [i for i, p in enumerate(prompts) if not p]
        if not empty:
            return encoded
        merged = stack_memories(encoded.memory, uncond)  # common padding; pick rows below
        positions = [i + len(prompts) if i in empty else i for i in range(len(prompts))]
        index = torch.tensor(positions, device=merged.lengths.device)
        sizes = tuple(merged.sizes[i] for i in positions)
        return replace(encoded, memory=TextMemory(merged.features[index], merged.lengths[index], sizes))

    @staticmethod
    def _pasted(image: np.ndarray, condition: ImageCondition | None) -> np.ndarray:
        """A masked edit with `paste`: the input's own pixels outside the mask (model/image_condition.py)."""
        if condition is None or condition.mask is None or not condition.paste:
            return image
        return feathered_paste(image, condition, PASTE_FEATHER)

    def _unconditional(self, cond: TextMemory, rows: list[SamplingParams]) -> TextMemory:
        """Per row: the negative prompt's features if given, else the learned null prompt."""
        null = self.transformer.unconditional_text(cond.lengths)
        negatives = {i: p.negative_prompt for i, p in enumerate(rows) if p.negative_prompt is not None}
        if not negatives:
            return null
        neg = self.text_encoder.encode(list(negatives.values())).memory
        merged = stack_memories(null, neg)  # common padding; pick rows below
        B = len(rows)
        index = torch.arange(B)
        for j, i in enumerate(negatives):
            index[i] = B + j
        index = index.to(merged.lengths.device)
        return TextMemory(merged.features[index], merged.lengths[index])


class Generation:
    """One batch in flight on a pipeline (`InfinityPipeline.start`): a scale per `step()`, then
    `finish()` decodes the rows that ran to the end."""

    def __init__(
        self,
        pipeline: InfinityPipeline,
        schedule: ScaleSchedule,
        seeds: list[int],
        prompt_tokens: list[int],
        conditions: list[ImageCondition | None],
        sampling: Sampling,
        text_seconds: float,
        image_seconds: float,
    ) -> None:
        self.pipeline, self.schedule, self.seeds, self.prompt_tokens = pipeline, schedule, seeds, prompt_tokens
        self.conditions, self.sampling = conditions, sampling
        self.text_seconds, self.image_seconds = text_seconds, image_seconds
        self.transformer_seconds = 0.0

    @property
    def done(self) -> bool:
        return self.sampling.done

    @property
    def rows(self) -> tuple[int, ...]:
        """Prompt index of each row still running."""
        return self.sampling.rows

    @property
    def scale_index(self) -> int:
        """The scale the next `step()` samples."""
        return self.sampling.scale_index

    @property
    def guided(self) -> bool:
        """Its rows still run with their unconditional twins (only such batches merge with each other)."""
        return self.sampling.state.guided

    def step(self, on_scale: ScaleCallback | None = None) -> ScaleEvent:
        """The next scale of every running row; `on_scale` may name rows to drop (cancelled)."""
        pipeline = self.pipeline
        with pipeline._out_of_memory(len(self.rows)), torch.inference_mode():
            t0 = time.perf_counter()
            event = self.sampling.step(on_scale)
            _sync(pipeline.device)
            self.transformer_seconds += time.perf_counter() - t0
        return event

    def can_absorb(self, other: Generation) -> bool:
        """`other` stands at this one's scale of the same schedule: they can run as one batch from here."""
        return self.sampling.can_absorb(other.sampling)

    def absorb(self, other: Generation) -> None:
        """Run `other`'s rows in this batch from now on (continuous batching: a request that caught up
        with a running one); its prompt index i becomes len(this one's prompts) + i. Images do not
        change: each row's numbers are its own (batch invariance)."""
        offset = len(self.seeds)
        with self.pipeline._out_of_memory(len(self.rows) + len(other.rows)), torch.inference_mode():
            self.sampling.absorb(other.sampling, offset)
        self.seeds = self.seeds + other.seeds
        self.prompt_tokens = self.prompt_tokens + other.prompt_tokens
        self.conditions = self.conditions + other.conditions
        self.text_seconds += other.text_seconds
        self.image_seconds += other.image_seconds
        self.transformer_seconds += other.transformer_seconds

    def finish(self, rows: Collection[int] | None = None) -> GenerationResult:
        """Decode the accumulated latent of the rows that ran to the end with finite logits: all of them,
        or only those among `rows` (prompt indices). In parts, a caller hands each request its images as
        soon as they are decoded instead of after the whole batch's (call once per disjoint part;
        `GenerationResult.combine` joins the parts)."""
        pipeline, out = self.pipeline, self.sampling.output()
        wanted = set(out.rows if rows is None else rows)
        out = replace(out, nonfinite=tuple(r for r in out.nonfinite if r in wanted))
        with pipeline._out_of_memory(len(out.rows)), torch.inference_mode():
            t0 = time.perf_counter()
            keep = [k for k, row in enumerate(out.rows) if row in wanted and row not in out.nonfinite]
            decoded = list(pipeline.decode_latent(out.latent[keep])) if keep else []
            conditions = [self.conditions[out.rows[k]] for k in keep]
            decoded = [pipeline._pasted(image, c) for image, c in zip(decoded, conditions, strict=True)]
            decode_seconds = time.perf_counter() - t0
        return self._result(out, keep, decoded, decode_seconds)

    def _result(
        self, out: SampleOutput, keep: list[int], decoded: list[np.ndarray], decode_seconds: float
    ) -> GenerationResult:
        kept = tuple(out.rows[k] for k in keep)
        tokens = sum(self.schedule.lengths) * self.pipeline.transformer.config.token_bits
        timings = StageTimings(
            self.text_seconds, self.transformer_seconds, decode_seconds, tuple(out.scale_seconds), self.image_seconds
        )
        return GenerationResult(
            rows=kept,
            nonfinite=out.nonfinite,
            images=decoded,
            bits=[b[keep].cpu().numpy() for b in out.bits],
            seeds=[self.seeds[i] for i in kept],
            prompt_tokens=[self.prompt_tokens[i] for i in kept],
            image_tokens=tokens,
            timings=timings,
        )
