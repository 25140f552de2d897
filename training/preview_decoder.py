"""Stage 3b: the stream preview decoder (model/preview.py), trained against the frozen VAE decoder.

    python -m training.preview_decoder [--weights weights/default] [--out FILE] [--steps N] [--threads 1]

Examples are the latents previews see: scenes rendered by shapes.py (half in the VAE's free layouts,
half in the transformer's composed ones) encoded by the VAE, quantised over the schedule's scales,
each scale's bits partly flipped as a sampler gets them wrong, and every partial sum of those codes,
accumulated as the sampler accumulates them. The target of each is the real decoder's image of it,
so the preview learns the decoder (what the final image will be), not the scene. Examples are built
once (one decode each; most of the time), then the small network fits them with AdamW on MSE, the
loss the reported PSNR measures. Seeded: the same VAE and recipe give the same weights.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.preview import PreviewDecoder, PreviewDecoderConfig
from model.vae import BitwiseVAE
from training.common import (
    TRAIN_SEEDS,
    VALID_SEEDS,
    Progress,
    images_tensor,
    local_rng,
    psnr,
    scene_batch,
    warmup_cosine,
)
from training.recipe import IMAGE_SIZE, SCHEDULE, PreviewTraining

log = logging.getLogger(__name__)

FIRST_SEED = TRAIN_SEEDS + 2 * 10**7  # scenes the VAE stages did not draw


@dataclass(frozen=True)
class PreviewExamples:
    latents: torch.Tensor  # (N * K, d, h, w) partial sums, scene-major: scene i's K sums are rows iK..iK+K-1
    targets: torch.Tensor  # (N * K, 3, H, W) the real decoder's images of them, in [-1, 1]
    scales: int  # K, partial sums per scene


@dataclass(frozen=True)
class PreviewReport:
    psnr_db: float  # mean over held-out scenes and every partial sum
    last_psnr_db: float  # the last partial sum only (the final latent)
    seconds: float  # examples and training together


@torch.inference_mode()
def preview_examples(
    vae: BitwiseVAE, first_seed: int, count: int, flip: float, generator: torch.Generator, chunk: int = 64
) -> PreviewExamples:
    """`count` scenes from `first_seed` -> every partial sum of their (partly flipped) bits, decoded."""
    latents, targets, scales = [], [], SCHEDULE.vae_scales(vae.config.spatial_patchify)
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        free = scene_batch(first_seed + start, (n + 1) // 2, held_out=None, layout="free")
        composed = scene_batch(first_seed + start + (n + 1) // 2, n // 2, held_out=None, layout="composed")
        bits = vae.encode_bits(images_tensor(free + composed, IMAGE_SIZE), scales).bits
        sums = torch.stack(_partial_sums(vae, bits, flip, generator), dim=1)  # (n, K, d, h, w)
        latents.append(sums.flatten(0, 1))
        targets.append(vae.decode(latents[-1]))
    return PreviewExamples(torch.cat(latents), torch.cat(targets), len(scales))


def _partial_sums(
    vae: BitwiseVAE, bits: list[torch.Tensor], flip: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """Per scale, the (B, d, h, w) sum so far of codes from bits (B, h_k, w_k, d), each scene's bits
    flipped at a rate drawn uniformly from [0, flip] per scale."""
    q, summed, out = vae.quantizer, None, []
    final = (bits[-1].shape[1], bits[-1].shape[2])  # (h, w) of the last scale
    for k, b in enumerate(bits):
        rate = torch.rand(len(b), 1, 1, 1, generator=generator) * flip
        flips = torch.rand(b.shape, generator=generator) < rate
        summed = q.accumulate(summed, q.codes(b ^ flips.long(), k), final)
        out.append(summed)
    return out


def train_preview_decoder(vae: BitwiseVAE, t: PreviewTraining, seed: int = 0) -> tuple[PreviewDecoder, PreviewReport]:
    """A PreviewDecoder for `vae` (frozen, not changed), and its held-out PSNR against the real decoder."""
    start = time.monotonic()
    vae = vae.eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 5)
    train = preview_examples(vae, FIRST_SEED, t.scenes, t.flip, generator)
    valid = preview_examples(vae, VALID_SEEDS, t.valid_scenes, t.flip, generator)
    config = PreviewDecoderConfig(vae.config.bits, vae.config.stride, t.width, t.blocks)
    with local_rng(seed + 5):
        decoder = PreviewDecoder(config)
    opt = torch.optim.AdamW(decoder.parameters(), lr=t.lr, betas=(0.9, 0.99), weight_decay=0.0)
    progress = Progress("preview decoder", t.steps)
    decoder.train()
    for step in range(t.steps):
        pick = torch.randint(0, len(train.latents), (t.batch,), generator=generator)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, t.steps, t.lr, warmup=max(1, t.steps // 20), floor=0.02)
        loss = F.mse_loss(decoder(train.latents[pick]), train.targets[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress.update(step, loss=loss.item())
    decoder.eval().requires_grad_(False)
    report = _report(decoder, valid, time.monotonic() - start)
    log.info("preview decoder: held-out PSNR %.2f dB, last scale %.2f dB", report.psnr_db, report.last_psnr_db)
    return decoder, report


@torch.inference_mode()
def _report(decoder: PreviewDecoder, valid: PreviewExamples, seconds: float) -> PreviewReport:
    out = decoder(valid.latents)
    last = slice(valid.scales - 1, None, valid.scales)
    return PreviewReport(psnr(out, valid.targets), psnr(out[last], valid.targets[last]), seconds)


def main() -> None:
    from weights.loader import load_vae
    from weights.preview import PREVIEW_FILE, save_preview_decoder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path(__file__).parents[1] / "weights" / "default")
    parser.add_argument("--steps", type=int, default=PreviewTraining.steps)
    parser.add_argument("--scenes", type=int, default=PreviewTraining.scenes)
    parser.add_argument("--out", type=Path, help="default: preview_decoder.safetensors beside the VAE")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    vae = load_vae(args.weights / "vae.safetensors")
    decoder, report = train_preview_decoder(vae, PreviewTraining(steps=args.steps, scenes=args.scenes))
    out = args.out or args.weights / PREVIEW_FILE
    save_preview_decoder(decoder, out)
    log.info("wrote %s (%.1f s)", out, report.seconds)


if __name__ == "__main__":
    main()
