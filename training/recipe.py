"""The embedded default model's recipe: sizes, schedule and training budget, in one place.

Chosen for a 2-core CPU (see the shared training note): 64x64 images through a stride-8 VAE give
an 8x8 latent (a 128x128 / stride-16 variant trained 3x slower per image and had reached only 18 dB
after 200 steps); a 6-scale schedule (1, 2, 3, 4, 6, 8) is 130 tokens, 4x fewer than the
official 0.06M schedule, so the transformer sees ~4x more images per minute. Scale k's codes
have magnitude 0.6^k / sqrt(d) (VAEConfig.code_decay): with the official constant magnitude a
short CPU-trained autoencoder loses colour.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import TransformerConfig, VAEConfig
from model.schedules import ScaleSchedule
from training.shapes import Layout

IMAGE_SIZE = 64
SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)))


@dataclass(frozen=True)
class T5Size:
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256


@dataclass(frozen=True)
class VAETraining:
    steps: int = 1200
    batch: int = 32
    lr: float = 1.5e-3
    commitment: float = 1.0  # beta * ||f - sg(F_hat)||^2, the quantizer's loss
    l1: float = 1.0
    l2: float = 1.0
    # Objects cover ~5% of the pixels: unweighted, the reconstructions had the right shapes in the
    # wrong colours.
    object_weight: float = 5.0
    # Stage 1b: the decoder alone, trained further on the frozen encoder's bits. The bits (and so the
    # transformer's targets) do not change, only how they are drawn.
    decoder_steps: int = 400
    decoder_lr: float = 5e-4
    # Up to this fraction of each scale's bits flipped (bitwise self-correction's corruption, last scale
    # included) before decoding; 0 = clean bits. The transformer gets 10-20% of the bits wrong; a decoder
    # trained on clean bits turned 10% random flips into blobs (single-object ceiling 0.98 -> 0.52).
    decoder_flip: float = 0.15
    # Free layouts: the autoencoder should reconstruct objects anywhere (see shapes.py).
    layout: Layout = "free"


@dataclass(frozen=True)
class GroundingTraining:
    """Stage 1c, the text encoder's pre-training on its own (see grounding.py)."""

    steps: int = 1500
    batch: int = 128
    lr: float = 2e-3
    scenes: int = 30_000  # training-template captions, drawn apart from the latent cache's seeds
    joint_weight: float = 0.1  # the loss's weight while the encoder then trains with the transformer
    # Captions given an unknown word (inserted, or replacing a word that names nothing), in both
    # stages: a user's own wording, and the held-out templates' new words, reach the model as <unk>.
    unknown_words: float = 0.2


@dataclass(frozen=True)
class TransformerTraining:
    steps: int = 6000
    batch: int = 48
    lr: float = 1.5e-3
    warmup: int = 200
    weight_decay: float = 0.01
    text_dropout: float = 0.1  # rows trained with the null prompt, so that CFG works
    bsc_strength: float = 0.3  # bitwise self-correction: flip up to 30% of the bits per scale
    ema: float = 0.998
    # "uniform" or the official reweight_loss_by_scale ("sqrt_area"): see token_weights. The coarse
    # scales decide layout and colours: with "sqrt_area" the first four get 41% of the loss, not 23%.
    scale_weighting: str = "sqrt_area"
    cache_scenes: int = 30_000  # scenes rendered and VAE-encoded once, reused across epochs
    # Composed layouts: objects where the caption reads them (see shapes.py). With free layouts the
    # coarse scales are a coin toss the text cannot settle, and two-object prompts scored 0.04.
    layout: Layout = "composed"


@dataclass(frozen=True)
class PreviewTraining:
    """Stage 3b, the stream preview decoder (model/preview.py, training/preview_decoder.py)."""

    steps: int = 3000  # 0: no preview decoder (previews fall back to the fitted linear map)
    batch: int = 64  # partial sums per step
    lr: float = 2e-3
    scenes: int = 1024  # rendered, encoded once; each gives one partial sum per scale
    valid_scenes: int = 128  # held-out scenes for the reported PSNR
    # Up to this fraction of each scale's bits flipped per scene (uniform), as a sampler gets them wrong:
    # the transformer misses 10-20% of its bits and previews show exactly those latents. A tail up to
    # random bits (0.5 * u^2) scored 0.5 dB less on sampled latents, 2 dB less at the last scale.
    flip: float = 0.15
    width: int = 96  # PreviewDecoderConfig.width (64 wide, 2 blocks, 2000 steps: 3.5 dB less at the last scale)
    blocks: int = 3  # PreviewDecoderConfig.blocks


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vae: VAEConfig = VAEConfig(
        bits=32, base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1, code_decay=0.6, latent_bound=0.3
    )
    transformer: TransformerConfig = TransformerConfig(
        depth=6,
        width=256,
        num_heads=4,
        ffn_hidden=1024,
        token_bits=32,
        text_channels=128,
        text_maxlen=24,
        pool_heads=2,
        block_chunks=2,
    )
    t5: T5Size = T5Size()
    grounding: GroundingTraining = GroundingTraining()
    vae_training: VAETraining = VAETraining()
    transformer_training: TransformerTraining = TransformerTraining()
    preview: PreviewTraining = PreviewTraining()
    eval_cfg: float = 3.0
    eval_tau: float = 1.0
