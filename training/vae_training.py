"""Stage 1: the bitwise VAE, trained on rendered scenes (reconstruction + commitment losses)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from model.vae import BitwiseVAE
from training.bsc import corrupted_teacher_batch
from training.common import (
    TRAIN_SEEDS,
    VALID_SEEDS,
    Progress,
    images_tensor,
    load_checkpoint,
    local_rng,
    psnr,
    save_checkpoint,
    scene_batch,
    warmup_cosine,
)
from training.recipe import IMAGE_SIZE, SCHEDULE, Recipe, VAETraining
from training.shapes import BACKGROUNDS

log = logging.getLogger(__name__)


def object_mask(images: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """(B, 1, H, W) 1 where a pixel is far from every background colour. images in [-1, 1]."""
    backgrounds = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 127.5 - 1  # (K, 3)
    distance = (images[:, None] - backgrounds[None, :, :, None, None]).abs().amax(dim=2)  # (B, K, H, W)
    return (distance.amin(dim=1, keepdim=True) > threshold).float()


def vae_loss(
    vae: BitwiseVAE, images: torch.Tensor, recipe: Recipe, object_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reconstruction). The decoder sees the quantized latent; gradients pass straight through."""
    t = recipe.vae_training
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latent = vae.encoder(images)
    latent = latent.float()
    with torch.no_grad():
        quantized = vae.quantizer.encode(latent, SCHEDULE.scales).quantized
    z = latent + (quantized - latent).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = vae.decoder(z)
    recon = recon.float()
    weight = 1 + (object_weight - 1) * object_mask(images) if object_weight != 1 else torch.ones(())
    error = recon - images
    loss = (t.l1 * error.abs() + t.l2 * error.pow(2)).mul(weight).mean()
    return loss + t.commitment * F.mse_loss(latent, quantized), recon


@torch.no_grad()
def validation_psnr(vae: BitwiseVAE, count: int = 64, scales: tuple[tuple[int, int], ...] = SCHEDULE.scales) -> float:
    """PSNR of held-out scenes decoded from their bits (exactly the inference path)."""
    was_training = vae.training
    vae.eval()
    images = images_tensor(scene_batch(VALID_SEEDS, count, held_out=None, layout=VAETraining.layout), IMAGE_SIZE)
    recon = vae.reconstruct(images, scales)
    vae.train(was_training)
    return psnr(recon, images)


def decoder_loss(
    vae: BitwiseVAE,
    images: torch.Tensor,
    object_weight: float,
    flip: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reconstruction) of the decoder alone, from exactly the latent the sampler builds from bits.

    flip > 0: the bits are first corrupted as bitwise self-correction corrupts them (up to `flip` of
    each scale's bits flipped, later scales re-quantized against the corrupted history) and the last
    scale's bits flipped too, so the decoder learns to draw clean shapes from a sampler's imperfect bits.
    """
    with torch.no_grad():  # flip 0: exactly the clean bits' latent (bsc's strength 0)
        latent = corrupted_teacher_batch(
            vae.quantizer, vae.encode_latent(images), SCHEDULE.scales, flip, generator, flip_last=True
        ).latent
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon = vae.decoder(latent).float()
    weight = 1 + (object_weight - 1) * object_mask(images)
    error = recon - images
    return (error.abs() + error.pow(2)).mul(weight).mean(), recon


def refine_decoder(recipe: Recipe, vae: BitwiseVAE, workdir: Path) -> BitwiseVAE:
    """Stage 1b: train the decoder further with the encoder frozen, on clean or corrupted bits
    (decoder_flip). The encoder's bits are unchanged, so the latent cache and the transformer trained
    on it stay valid; only how the decoder draws bits changes."""
    t = recipe.vae_training
    ckpt_path = workdir / "decoder.ckpt"
    vae.requires_grad_(False).decoder.requires_grad_(True)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=t.decoder_lr, betas=(0.9, 0.95), weight_decay=0.0)
    generator = torch.Generator().manual_seed(recipe.seed + 3)
    start = 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        vae.decoder.load_state_dict(state["decoder"]), opt.load_state_dict(state["opt"])
        if "generator" in state:
            generator.set_state(state["generator"])
        start = state["step"]
        log.info("decoder: resuming at step %d", start)
    progress = Progress("decoder", t.decoder_steps, start)
    vae.decoder.train()
    first_seed = TRAIN_SEEDS + 10**7  # scenes the VAE stage did not draw
    for step in range(start, t.decoder_steps):
        scenes = scene_batch(first_seed + step * t.batch, t.batch, held_out=None, layout=t.layout)
        images = images_tensor(scenes, IMAGE_SIZE)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, t.decoder_steps, t.decoder_lr, warmup=max(1, t.decoder_steps // 20))
        loss, recon = decoder_loss(vae, images, t.object_weight, t.decoder_flip, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt.step()
        progress.update(step, loss=loss.item(), psnr=psnr(recon.detach(), images))
        if (step + 1) % 100 == 0 or step + 1 == t.decoder_steps:
            save_checkpoint(
                ckpt_path,
                decoder=vae.decoder.state_dict(),
                opt=opt.state_dict(),
                generator=generator.get_state(),
                step=step + 1,
            )
    vae.requires_grad_(False).eval()
    log.info("decoder: held-out PSNR %.2f dB (decoded from bits)", validation_psnr(vae))
    return vae


def train_vae(recipe: Recipe, workdir: Path) -> BitwiseVAE:
    t = recipe.vae_training
    ckpt_path = workdir / "vae.ckpt"
    with local_rng(recipe.seed):
        vae = BitwiseVAE(recipe.vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=t.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start = 0
    if (state := load_checkpoint(ckpt_path)) is not None:
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        start = state["step"]
        log.info("VAE: resuming at step %d", start)
    progress = Progress("VAE", t.steps, start)
    vae.train()
    for step in range(start, t.steps):
        scenes = scene_batch(TRAIN_SEEDS + step * t.batch, t.batch, held_out=None, layout=t.layout)
        images = images_tensor(scenes, IMAGE_SIZE)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, t.steps, t.lr, warmup=max(1, t.steps // 20))
        loss, recon = vae_loss(vae, images, recipe, t.object_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        progress.update(step, loss=loss.item(), psnr=psnr(recon.detach(), images))
        if (step + 1) % 250 == 0 or step + 1 == t.steps:
            save_checkpoint(ckpt_path, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1)
    vae.eval()
    log.info("VAE: held-out PSNR %.2f dB (decoded from bits)", validation_psnr(vae))
    return vae
