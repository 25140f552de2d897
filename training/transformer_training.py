"""Stage 2: the Infinity transformer and the pre-trained small T5, trained jointly on the frozen VAE's bits.

Teacher forcing with bitwise self-correction, 10% null-prompt rows for classifier-free
guidance, AdamW with warm-up and cosine decay, bf16 autocast, an EMA of the weights for
sampling. Scenes are rendered and VAE-encoded once into a latent cache. The text encoder keeps
its stage-1c grounding loss, down-weighted, so that it does not unlearn word order.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, T5EncoderModel

from model.attention import TextMemory
from model.transformer import Infinity
from model.vae import BitwiseVAE
from training.bsc import corrupted_teacher_batch
from training.common import (
    TRAIN_SEEDS,
    Progress,
    fingerprint,
    images_tensor,
    load_checkpoint,
    local_rng,
    save_checkpoint,
    scene_batch,
    warmup_cosine,
    with_unknown_words,
)
from training.grounding import GroundingHead, SceneTargets, grounding_loss, scene_targets, t5_features
from training.recipe import IMAGE_SIZE, SCHEDULE, Recipe
from training.shapes import Layout

log = logging.getLogger(__name__)


@dataclass
class LatentCache:
    captions: list[str]
    latents: torch.Tensor  # (N, d, 8, 8) bf16 raw encoder outputs
    targets: SceneTargets  # what each scene holds, in reading order: the grounding loss's labels


@torch.no_grad()
def build_cache(vae: BitwiseVAE, count: int, path: Path, layout: Layout, chunk: int = 256) -> LatentCache:
    """Reused while the encoder and the layout are unchanged; a VAE trained further (a resumed run)
    rebuilds it."""
    encoder = fingerprint(vae.encoder)
    if path.exists():
        state = torch.load(path, weights_only=True)
        if (
            len(state["captions"]) >= count
            and state.get("encoder") == encoder
            and state.get("layout") == layout
            and "targets" in state
        ):
            return LatentCache(
                state["captions"][:count], state["latents"][:count], SceneTargets(**state["targets"])[:count]
            )
        log.info("latent cache: stale or too small, rebuilding")
    scenes, latents = [], []
    progress = Progress("latent cache", math.ceil(count / chunk))
    for i, start in enumerate(range(0, count, chunk)):
        batch = scene_batch(TRAIN_SEEDS + 10**8 + start, min(chunk, count - start), held_out=False, layout=layout)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            latents.append(vae.encoder(images_tensor(batch, IMAGE_SIZE)).to(torch.bfloat16))
        scenes.extend(batch)
        progress.update(i)
    cache = LatentCache([s.caption for s in scenes], torch.cat(latents), scene_targets(scenes))
    torch.save(
        {
            "captions": cache.captions,
            "latents": cache.latents,
            "encoder": encoder,
            "layout": layout,
            "targets": vars(cache.targets),
        },
        path,
    )
    return cache


def encode_text(
    t5: T5EncoderModel, tokenizer: PreTrainedTokenizerFast, captions: list[str], max_len: int
) -> TextMemory:
    """Differentiable T5 features (B, T, Ct) with padding zeroed."""
    features, mask = t5_features(t5, tokenizer, captions, max_len)
    return TextMemory(features.float() * mask.unsqueeze(-1), mask.sum(1))


def drop_text(model: Infinity, text: TextMemory, rate: float, generator: torch.Generator) -> TextMemory:
    """Replace a random `rate` of the rows by the learned null prompt cut to the row's length."""
    drop = torch.rand(len(text.lengths), generator=generator) < rate
    if not drop.any():
        return text
    null = model.cfg_uncond[: text.features.shape[1]].float().unsqueeze(0)
    features = torch.where(drop[:, None, None], null.expand_as(text.features), text.features)
    valid = (torch.arange(features.shape[1])[None, :] < text.lengths[:, None]).unsqueeze(-1)
    return TextMemory(features * valid, text.lengths)


def bit_loss(
    model: Infinity,
    t5,
    tokenizer,
    captions: list[str],
    latents: torch.Tensor,
    recipe: Recipe,
    generator: torch.Generator,
    quantizer,
    grounding: tuple[GroundingHead, SceneTargets] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale-weighted bit loss, and the text encoder's grounding loss (0 without `grounding`)."""
    t = recipe.transformer_training
    teacher = corrupted_teacher_batch(quantizer, latents.float(), SCHEDULE.scales, t.bsc_strength, generator)
    captions = with_unknown_words(captions, recipe.grounding.unknown_words, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = encode_text(t5, tokenizer, captions, recipe.transformer.text_maxlen)
        text = drop_text(model, encoded, t.text_dropout, generator)
        logits = torch.cat(model(model.condition(text, "sdpa"), SCHEDULE, teacher.inputs), dim=1)
    aux = torch.zeros(())
    if grounding is not None:
        mask = torch.arange(encoded.features.shape[1])[None, :] < encoded.lengths[:, None]
        aux = grounding_loss(grounding[0], encoded.features, mask, grounding[1])
    logits = logits.float().view(*teacher.labels.shape, 2)  # (B, L, D, 2)
    per_bit = F.cross_entropy(logits.reshape(-1, 2), teacher.labels.reshape(-1), reduction="none")
    per_token = per_bit.view(teacher.labels.shape).mean(dim=(0, 2))  # (L,)
    return (per_token * token_weights(SCHEDULE.scales, t.scale_weighting)).sum(), aux


def token_weights(scales: tuple[tuple[int, int], ...], weighting: str) -> torch.Tensor:
    """(L,) loss weight per token, summing to 1.

    "uniform": every token alike, so the last scale (half the tokens here) dominates.
    "sqrt_area": the official trainer's reweight_loss_by_scale: a token of an h x w scale weighs
    1/sqrt(h*w), so scale k as a whole weighs sqrt(h*w). The coarse scales, where the layout and
    which object gets which colour are decided, get 4-5x more weight than under "uniform".
    """
    if weighting not in ("uniform", "sqrt_area"):
        raise ValueError(f"scale_weighting must be 'uniform' or 'sqrt_area', got {weighting!r}")
    per_scale = [torch.full((h * w,), 1.0 if weighting == "uniform" else (h * w) ** -0.5) for h, w in scales]
    weights = torch.cat(per_scale)
    return weights / weights.sum()


def lr_at(step: int, recipe: Recipe) -> float:
    t = recipe.transformer_training
    return warmup_cosine(step, t.steps, t.lr, t.warmup)


def train_transformer(
    recipe: Recipe,
    vae: BitwiseVAE,
    t5: T5EncoderModel,
    tokenizer: PreTrainedTokenizerFast,
    head: GroundingHead,
    workdir: Path,
    on_checkpoint=None,
) -> tuple[Infinity, T5EncoderModel]:
    """Returns the EMA transformer and T5. on_checkpoint(step, model, t5) runs after each checkpoint."""
    # dropout draws from a local seed (the models are built with batch invariance off: one GEMM per
    # layer for the whole batch, for training speed)
    with local_rng(recipe.seed + 5):
        return _train_transformer(recipe, vae, t5, tokenizer, head, workdir, on_checkpoint)


def _train_transformer(
    recipe: Recipe,
    vae: BitwiseVAE,
    t5: T5EncoderModel,
    tokenizer: PreTrainedTokenizerFast,
    head: GroundingHead,
    workdir: Path,
    on_checkpoint=None,
) -> tuple[Infinity, T5EncoderModel]:
    t = recipe.transformer_training
    cache = build_cache(vae, t.cache_scenes, workdir / "latents.pt", t.layout)
    with local_rng(recipe.seed + 1):
        model = Infinity(recipe.transformer)
    ema_model, ema_t5 = copy.deepcopy(model).requires_grad_(False), copy.deepcopy(t5).requires_grad_(False)
    params = list(model.parameters()) + list(t5.parameters()) + list(head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0}]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.97))
    generator = torch.Generator().manual_seed(recipe.seed + 2)
    start = 0
    ckpt_path = workdir / "transformer.ckpt"
    if (state := load_checkpoint(ckpt_path)) is not None:
        for module, key in (
            (model, "model"),
            (t5, "t5"),
            (head, "head"),
            (ema_model, "ema"),
            (ema_t5, "ema_t5"),
            (opt, "opt"),
        ):
            module.load_state_dict(state[key])
        generator.set_state(state["generator"])
        start = state["step"]
        log.info("transformer: resuming at step %d", start)
    progress = Progress("transformer", t.steps, start)
    model.train(), t5.train(), head.train()
    order = torch.randperm(len(cache.captions), generator=torch.Generator().manual_seed(recipe.seed))
    for step in range(start, t.steps):
        index = order[(torch.arange(t.batch) + step * t.batch) % len(order)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        bits, aux = bit_loss(
            model,
            t5,
            tokenizer,
            [cache.captions[i] for i in index],
            cache.latents[index],
            recipe,
            generator,
            vae.quantizer,
            (head, cache.targets[index]),
        )
        opt.zero_grad(set_to_none=True)
        (bits + recipe.grounding.joint_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for ema, live in ((ema_model, model), (ema_t5, t5)):
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.lerp_(pl, 1 - t.ema)
        progress.update(step, loss=bits.item(), grounding=aux.item(), lr=lr_at(step, recipe))
        if (step + 1) % 500 == 0 or step + 1 == t.steps:
            save_checkpoint(
                ckpt_path,
                model=model.state_dict(),
                t5=t5.state_dict(),
                head=head.state_dict(),
                ema=ema_model.state_dict(),
                ema_t5=ema_t5.state_dict(),
                opt=opt.state_dict(),
                generator=generator.get_state(),
                step=step + 1,
            )
            if on_checkpoint is not None:
                on_checkpoint(step + 1, ema_model, ema_t5)
    return ema_model.eval(), ema_t5.eval()
