"""The whole training command at toy sizes: stages run, checkpoint, resume and export a loadable model."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from model.config import RuntimeConfig, SamplingParams, TransformerConfig, VAEConfig
from model.preview import PreviewDecoder
from model.vae import BitwiseVAE
from training.build import train_default
from training.common import TRAIN_SEEDS, fingerprint, scene_batch
from training.grounding import scene_targets
from training.recipe import GroundingTraining, PreviewTraining, Recipe, T5Size
from training.transformer_training import build_cache
from training.vae_training import refine_decoder, train_vae
from weights.default import load_default_pipeline

TOY = Recipe(
    vae=VAEConfig(bits=8, base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, code_decay=0.6, norm_groups=8),
    transformer=TransformerConfig(
        depth=2,
        width=64,
        num_heads=2,
        ffn_hidden=128,
        token_bits=8,
        text_channels=32,
        text_maxlen=24,
        pool_heads=1,
        block_chunks=2,
    ),
    t5=T5Size(d_model=32, num_layers=1, num_heads=2, d_ff=64),
    grounding=GroundingTraining(steps=2, batch=4, scenes=16),
    preview=PreviewTraining(steps=2, batch=4, scenes=2, valid_scenes=2, width=8, blocks=1),
)
TOY = replace(
    TOY,
    vae_training=replace(TOY.vae_training, steps=3, batch=4, decoder_steps=2),
    transformer_training=replace(TOY.transformer_training, steps=3, batch=4, warmup=1, cache_scenes=16),
)


def test_train_default_end_to_end_and_resume(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    seen = []
    caller_rng = torch.get_rng_state()
    train_default(work, out, TOY, on_checkpoint=lambda step, model, t5: seen.append(step))
    assert seen == [3]
    assert torch.equal(torch.get_rng_state(), caller_rng), "training must seed local generators only"
    assert {p.name for p in out.iterdir()} == {
        "transformer.safetensors",
        "vae.safetensors",
        "text_encoder",
        "schedule.json",
        "preview_decoder.safetensors",
    }
    facts = json.loads((out / "schedule.json").read_text())
    assert (facts["vae_layout"], facts["transformer_layout"], facts["scale_weighting"]) == (
        "free",
        "composed",
        "sqrt_area",
    )
    assert facts["grounding_steps"] == 2
    assert {"model", "t5", "head", "ema", "ema_t5", "opt"} <= set(
        torch.load(work / "transformer.ckpt", weights_only=True)
    )
    pipe, default = load_default_pipeline(RuntimeConfig(), out)
    assert not default.placeholder and default.schedule.scales[-1] == (8, 8)
    assert pipe.vae.config.code_decay == 0.6 and pipe.vae.config.norm_groups == 8
    result = pipe.generate(["a red circle"], default.schedule, SamplingParams(seed=0))
    assert result.images[0].shape == (64, 64, 3)
    fast = load_default_pipeline(RuntimeConfig(preview="fast"), out)[0]
    assert isinstance(fast.fast_preview, PreviewDecoder)  # the exported one, not a fitted linear map
    # a rerun resumes from the finished checkpoints: no stage trains again
    mtimes = {
        name: (work / name).stat().st_mtime
        for name in ("vae.ckpt", "decoder.ckpt", "grounding.ckpt", "transformer.ckpt")
    }
    train_default(work, out, TOY)
    assert {name: (work / name).stat().st_mtime for name in mtimes} == mtimes
    again = load_default_pipeline(RuntimeConfig(), out)[0].generate(
        ["a red circle"], default.schedule, SamplingParams(seed=0)
    )
    assert np.array_equal(again.images[0], result.images[0])


@pytest.mark.parametrize("flip", [0.0, 0.15])
def test_decoder_refinement_keeps_the_bits(tmp_path, flip):
    """Stage 1b trains the decoder only (from clean or corrupted bits): the encoder, so every bit the
    transformer learns, is unchanged."""
    recipe = replace(TOY, vae_training=replace(TOY.vae_training, decoder_flip=flip))
    vae = train_vae(recipe, tmp_path)
    encoder, decoder = fingerprint(vae.encoder), fingerprint(vae.decoder)
    refined = refine_decoder(recipe, vae, tmp_path)
    assert fingerprint(refined.encoder) == encoder
    assert fingerprint(refined.decoder) != decoder
    assert torch.load(tmp_path / "decoder.ckpt", weights_only=True)["step"] == 2


def test_latent_cache_is_rebuilt_for_another_layout(tmp_path):
    """The transformer's scenes are laid out as the recipe says; a cache of the other layout is stale."""
    vae = BitwiseVAE(TOY.vae).eval()
    path = tmp_path / "latents.pt"
    free = build_cache(vae, 8, path, "free", chunk=8)
    assert build_cache(vae, 8, path, "free", chunk=8).latents.equal(free.latents)  # reused
    composed = build_cache(vae, 8, path, "composed", chunk=8)
    assert composed.captions == free.captions  # same scenes, objects moved
    assert not composed.latents.equal(free.latents)
    assert torch.load(path, weights_only=True)["layout"] == "composed"
    scenes = scene_batch(TRAIN_SEEDS + 10**8, 8, held_out=False, layout="composed")
    assert composed.targets.colours.equal(scene_targets(scenes).colours)  # the grounding loss's labels
