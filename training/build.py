"""`infinity-serve train-default`: train the embedded default model from scratch, resumably, and export it.

Stages, each checkpointed in the work directory and skipped or resumed on a rerun:
0. tokenizer over the caption vocabulary + a small T5 (random init, seeded);
1. the bitwise VAE, then its decoder alone on the frozen encoder's bits; 1c. the T5 alone, taught to parse a
caption into its scene (grounding.py); 2. the transformer and T5 jointly; 3. export to weights/default/;
3b. the stream preview decoder against the VAE decoder (preview_decoder.py; a few CPU minutes, not
checkpointed; skipped when its recipe has 0 steps).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast, T5EncoderModel

from model.t5_builder import build_t5_encoder_dir
from model.transformer import Infinity
from model.vae import BitwiseVAE
from training.grounding import pretrain_text_encoder
from training.preview_decoder import train_preview_decoder
from training.recipe import SCHEDULE, Recipe
from training.shapes import vocabulary
from training.transformer_training import train_transformer
from training.vae_training import refine_decoder, train_vae, validation_psnr
from weights.loader import vae_metadata
from weights.preview import PREVIEW_FILE, save_preview_decoder

log = logging.getLogger(__name__)


def export(
    out: Path,
    model: Infinity,
    vae: BitwiseVAE,
    t5: T5EncoderModel,
    tokenizer,
    psnr_db: float,
    minutes: float,
    recipe: Recipe = Recipe(),
) -> None:
    """Half-precision safetensors (the loader upcasts), the T5 directory and the schedule."""
    out.mkdir(parents=True, exist_ok=True)

    def half(m: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.to(torch.float16).contiguous() for k, v in m.state_dict().items()}

    save_file(half(model), str(out / "transformer.safetensors"), metadata={"format": "infinity-serve"})
    save_file(
        half(vae), str(out / "vae.safetensors"), metadata={"format": "infinity-serve", **vae_metadata(vae.config)}
    )
    t5.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "text_encoder")
    facts = {
        "scales": SCHEDULE.scales,
        "vae_psnr_db": round(psnr_db, 2),
        "training_minutes": round(minutes, 1),
        "vae_steps": recipe.vae_training.steps,
        "decoder_steps": recipe.vae_training.decoder_steps,
        "decoder_flip": recipe.vae_training.decoder_flip,
        "grounding_steps": recipe.grounding.steps,
        "transformer_steps": recipe.transformer_training.steps,
        "scale_weighting": recipe.transformer_training.scale_weighting,
        "vae_layout": recipe.vae_training.layout,
        "transformer_layout": recipe.transformer_training.layout,
    }
    (out / "schedule.json").write_text(json.dumps(facts, indent=1))
    log.info("exported the default model to %s", out)


def train_default(workdir: Path, out: Path, recipe: Recipe = Recipe(), on_checkpoint=None) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    t5_dir = workdir / "t5_init"
    if not (t5_dir / "config.json").exists():
        s = recipe.t5
        build_t5_encoder_dir(
            t5_dir,
            vocabulary(),
            d_model=s.d_model,
            num_layers=s.num_layers,
            num_heads=s.num_heads,
            d_ff=s.d_ff,
            seed=recipe.seed,
        )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(t5_dir)  # the class that wrote it
    t5 = T5EncoderModel.from_pretrained(t5_dir)
    vae = refine_decoder(recipe, train_vae(recipe, workdir), workdir)
    psnr_db = validation_psnr(vae)
    head = pretrain_text_encoder(
        t5,
        tokenizer,
        recipe.grounding,
        recipe.transformer.text_maxlen,
        recipe.transformer_training.layout,
        recipe.seed,
        workdir,
    )
    model, ema_t5 = train_transformer(recipe, vae, t5, tokenizer, head, workdir, on_checkpoint)
    minutes = (time.monotonic() - start) / 60
    export(out, model, vae, ema_t5, tokenizer, psnr_db, minutes, recipe)
    if recipe.preview.steps > 0:  # retrained on every export: it must match the exported VAE
        preview, report = train_preview_decoder(vae, recipe.preview, recipe.seed)
        save_preview_decoder(preview, out / PREVIEW_FILE)
        log.info("preview decoder: %.1f s, held-out PSNR %.2f dB vs the VAE decoder", report.seconds, report.psnr_db)
    else:
        (out / PREVIEW_FILE).unlink(missing_ok=True)  # one made for an earlier VAE would mislead
