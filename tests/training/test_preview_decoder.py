"""training/preview_decoder.py and weights/preview.py at toy sizes: examples, seeded training, the file."""

from dataclasses import replace

import pytest
import torch

from model.config import VAEConfig
from model.preview import PreviewDecoder
from model.vae import BitwiseVAE
from training.common import local_rng
from training.preview_decoder import preview_examples, train_preview_decoder
from training.recipe import PreviewTraining
from weights.io import CheckpointError
from weights.preview import load_preview_decoder, save_preview_decoder

VAE = VAEConfig(bits=8, base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1, code_decay=0.6, norm_groups=8)
TINY = PreviewTraining(steps=3, batch=4, scenes=2, valid_scenes=2, width=8, blocks=1)


@pytest.fixture(scope="module")
def vae() -> BitwiseVAE:
    with local_rng(0):
        return BitwiseVAE(VAE).eval().requires_grad_(False)


def test_examples_are_every_partial_sum_decoded_by_the_real_decoder(vae):
    examples = preview_examples(vae, 0, 3, flip=0.0, generator=torch.Generator().manual_seed(0), chunk=2)
    assert examples.scales == 6 and examples.latents.shape == (3 * 6, 8, 8, 8)
    assert examples.targets.shape == (3 * 6, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(examples.targets[:6], vae.decode(examples.latents[:6]))
    first = examples.latents[0]  # scale 1 is 1x1: its partial sum is one code everywhere
    assert torch.equal(first, first[:, :1, :1].expand_as(first))
    last = examples.latents[5]  # flip 0: the last partial sum is the quantized latent itself
    images_bits = vae.encode_bits(_images(0, 3)[:1], tuple((s, s) for s in (1, 2, 3, 4, 6, 8)))
    assert torch.allclose(last, images_bits.quantized[0])


def _images(first_seed: int, count: int) -> torch.Tensor:
    from training.common import images_tensor, scene_batch

    free = scene_batch(first_seed, (count + 1) // 2, held_out=None, layout="free")
    composed = scene_batch(first_seed + (count + 1) // 2, count // 2, held_out=None, layout="composed")
    return images_tensor(free + composed, 64)


def test_training_is_seeded_leaves_the_vae_and_global_rng_alone_and_round_trips(vae, tmp_path):
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    caller_rng = torch.get_rng_state()
    decoder, report = train_preview_decoder(vae, TINY, seed=0)
    again, _ = train_preview_decoder(vae, TINY, seed=0)
    other, _ = train_preview_decoder(vae, TINY, seed=1)
    assert torch.equal(torch.get_rng_state(), caller_rng), "training must seed local generators only"
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    assert (decoder.config.bits, decoder.config.stride, decoder.config.width) == (8, 8, 8)
    state, same, differs = decoder.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(v, same[k]) for k, v in state.items())
    assert not all(torch.equal(v, differs[k]) for k, v in state.items())
    assert report.psnr_db > 0 and report.last_psnr_db > 0 and report.seconds > 0

    path = tmp_path / "preview_decoder.safetensors"
    save_preview_decoder(decoder, path)
    loaded = load_preview_decoder(path, vae.config)
    assert isinstance(loaded, PreviewDecoder) and loaded.config == decoder.config
    latent = torch.randn(2, 8, 8, 8) * 0.1
    assert torch.allclose(loaded.preview(latent), decoder.preview(latent), atol=2e-2)  # float16 on disk


def test_a_preview_decoder_file_for_another_vae_or_without_config_is_refused(vae, tmp_path):
    decoder, _ = train_preview_decoder(vae, replace(TINY, steps=1), seed=0)
    path = tmp_path / "preview_decoder.safetensors"
    save_preview_decoder(decoder, path)
    with pytest.raises(CheckpointError, match="made for 8-bit latents at stride 8, the VAE has 16 bits"):
        load_preview_decoder(path, replace(VAE, bits=16))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="no `preview_decoder` config"):
        load_preview_decoder(path, vae.config)
