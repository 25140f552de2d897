from dataclasses import replace

import numpy as np
import pytest
import torch

from model.config import RuntimeConfig, SamplingParams, ScaleListError
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from model.text_encoder import T5TextEncoder

SCHEDULE = ScaleSchedule.official(1.0, "0.06M")


@pytest.fixture(scope="module")
def pipe(t5_dir, tiny_transformer, tiny_vae):
    import copy

    return InfinityPipeline(copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir))


def test_generate_returns_rgb_images_bits_seeds_and_timings(pipe):
    result = pipe.generate(["a red circle", "two blue squares"], SCHEDULE, SamplingParams(seed=3))
    assert len(result.images) == 2 and result.images[0].shape == (64, 64, 3)
    assert result.images[0].dtype == np.uint8
    assert result.seeds == [3, 3]
    assert [b.shape for b in result.bits] == [(2, h, w, 8) for h, w in SCHEDULE.scales]
    assert result.prompt_tokens == [4, 4]
    assert result.image_tokens == 521 * 8
    assert len(result.timings.scales) == 7 and result.timings.transformer > 0
    # the image is the decoded latent of exactly these bits
    latent = pipe.vae.quantizer.bits_to_latent([torch.from_numpy(b).long() for b in result.bits], SCHEDULE.scales)
    assert np.array_equal(pipe.decode_latent(latent), np.stack(result.images))


def test_random_seeds_are_reported_and_reproduce(pipe):
    first = pipe.generate(["a star"], SCHEDULE, SamplingParams(tau=1.0))
    again = pipe.generate(["a star"], SCHEDULE, SamplingParams(tau=1.0, seed=first.seeds[0]))
    assert np.array_equal(first.images[0], again.images[0])


def test_text_features_do_not_depend_on_padding(pipe):
    enc = pipe.text_encoder
    alone = enc.encode(["a red circle"]).memory
    padded = enc.encode(["a red circle", "the big small green triangle to the left of a star"]).memory
    assert torch.equal(padded.features[0, :4], alone.features[0])
    assert padded.features[0, 4:].abs().max() == 0


def test_negative_prompt_replaces_the_null_prompt_for_its_row_only(pipe):
    plain = SamplingParams(seed=1, cfg=4.0)
    neg = SamplingParams(seed=1, cfg=4.0, negative_prompt="a blue star")
    a = pipe.generate(["a red circle", "a red circle"], SCHEDULE, [plain, neg])
    b = pipe.generate(["a red circle"], SCHEDULE, [plain])
    assert np.array_equal(a.images[0], b.images[0])
    assert not np.array_equal(a.images[0], a.images[1])


def test_bfloat16_pipeline_runs_and_stays_close(pipe, t5_dir, tiny_transformer, tiny_vae):
    """bfloat16 against float32, same weights, greedy (no seed involved): the same bits but a few.

    Measured here (2026-11-30, torch CPU): scales 0-4 identical, then 99.65% and 99.95% equal bits;
    image mean |diff| 5.4 / 255; the same latent decoded by both VAEs 1.0 / 255. A garbage run lands
    far away: the bf16 pipeline with another transformer (seed 1) has 22-67% equal bits per scale and
    a mean image |diff| of ~44; the fp8-rounded blocks 94% equal bits at scale 1; noisy VAE decoder weights
    an image |diff| of 58. The bounds sit between the two, with room for other CPUs' bf16 rounding.
    """
    import copy

    bf16 = InfinityPipeline(
        copy.deepcopy(tiny_transformer),
        copy.deepcopy(tiny_vae),
        T5TextEncoder.from_dir(t5_dir),
        RuntimeConfig(dtype="bfloat16"),
    )
    assert bf16.transformer.blocks[0].sa.mat_qkv.weight.dtype == torch.bfloat16
    assert bf16.transformer.head.weight.dtype == torch.float32  # fp32 island, as the official run
    params = SamplingParams(seed=0, top_k=1)
    result = bf16.generate(["a red circle"], SCHEDULE, params)
    exact = pipe.generate(["a red circle"], SCHEDULE, params)
    assert result.images[0].shape == (64, 64, 3)
    equal = [float((a == b).mean()) for a, b in zip(result.bits, exact.bits, strict=True)]
    assert min(equal) >= 0.99, equal  # so scales 0 and 1 (8 and 32 bits) identical, scale 2 one flip at most
    image_diff = np.abs(result.images[0].astype(np.float64) - exact.images[0]).mean()
    assert image_diff <= 12.0, image_diff
    latent = pipe.vae.quantizer.bits_to_latent([torch.from_numpy(b).long() for b in exact.bits], SCHEDULE.scales)
    decoder_diff = np.abs(bf16.decode_latent(latent).astype(np.float64) - pipe.decode_latent(latent)).mean()
    assert decoder_diff <= 3.0, decoder_diff


def test_bad_inputs_name_the_argument(pipe):
    with pytest.raises(ValueError, match="`params` has 1 entries for 2 prompts"):
        pipe.generate(["a", "b"], SCHEDULE, [SamplingParams()])
    with pytest.raises(ValueError, match="`prompts`"):
        pipe.generate("a red circle", SCHEDULE)
    with pytest.raises(ValueError, match="15"):
        pipe.generate(["a"], ScaleSchedule.custom(tuple((i, i) for i in range(1, 17))))


def test_a_short_per_scale_list_is_refused_before_any_work(pipe, monkeypatch):
    """The public `generate` is the Python callers' boundary: the one check of cfg/tau lists for them."""

    def no_work(*args, **kwargs):
        raise AssertionError("reached the text encoder with a short list")

    monkeypatch.setattr(pipe.text_encoder, "encode", no_work)
    with pytest.raises(ScaleListError, match="`cfg` lists 2 values but the schedule has 7 scales") as refused:
        pipe.generate(["a"], SCHEDULE, SamplingParams(cfg=(3.0, 3.0)))
    assert refused.value.param == "cfg"
    rows = [SamplingParams(), SamplingParams(tau=(0.5,) * 6)]  # one row of several
    with pytest.raises(ScaleListError, match="`tau` lists 6 values"):
        pipe.generate(["a", "b"], SCHEDULE, rows)


def test_inconsistent_components_are_refused(t5_dir, tiny_vae):
    from model.config import TRANSFORMER_SIZES
    from model.transformer import Infinity

    with pytest.raises(ValueError, match="8-bit tokens"):
        InfinityPipeline(Infinity(TRANSFORMER_SIZES["small"]), tiny_vae, T5TextEncoder.from_dir(t5_dir))
    wide_text = replace(TRANSFORMER_SIZES["tiny"], text_channels=48)
    with pytest.raises(ValueError, match="text_channels"):
        InfinityPipeline(Infinity(wide_text), tiny_vae, T5TextEncoder.from_dir(t5_dir))


def _row_logits(pipe: InfinityPipeline, prompts: list[str], row: int, monkeypatch) -> list[torch.Tensor]:
    """The raw logits of row `row` (seed 123; the others other seeds) at every scale of one `generate`."""
    seen: list[torch.Tensor] = []
    step = pipe.transformer.step

    def recording(*args, **kwargs) -> torch.Tensor:
        logits = step(*args, **kwargs)
        seen.append(logits[row].clone())
        return logits

    params = [SamplingParams(seed=123 if i == row else i) for i in range(len(prompts))]
    with monkeypatch.context() as patch:
        patch.setattr(pipe.transformer, "step", recording)
        pipe.generate(prompts, SCHEDULE, params)
    return seen


def test_two_pipelines_in_one_process_keep_their_own_batch_invariance(t5_dir, tiny_vae, monkeypatch):
    """Batch invariance is a pipeline's own (RuntimeConfig), not the process's: building or running a
    pipeline without it leaves another one's images independent of their batch."""
    import copy

    from model.config import TRANSFORMER_SIZES
    from tests.conftest import make_transformer

    # Widths at which the GEMM library picks its kernel by the number of rows (tests/model/test_sampler.py).
    config = replace(TRANSFORMER_SIZES["tiny"], width=256, num_heads=4, ffn_hidden=1024)
    text = T5TextEncoder.from_dir(t5_dir)
    invariant = InfinityPipeline(
        make_transformer(config), copy.deepcopy(tiny_vae), text, RuntimeConfig(batch_invariant=True)
    )
    fused = InfinityPipeline(
        make_transformer(config),
        copy.deepcopy(tiny_vae),
        text,  # built second, on purpose
        RuntimeConfig(batch_invariant=False),
    )
    prompt = "a red circle"
    batch = ["the big green triangle to the left of a star", prompt, "two blue squares", "a star"]
    alone = _row_logits(invariant, [prompt], 0, monkeypatch)
    fused_alone = _row_logits(fused, [prompt], 0, monkeypatch)
    fused_together = _row_logits(fused, batch, 1, monkeypatch)
    together = _row_logits(invariant, batch, 1, monkeypatch)
    assert len(alone) == len(together) == SCHEDULE.num_scales
    assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))
    # the other pipeline really runs one GEMM per layer: its row's logits move with the batch
    assert not all(torch.equal(a, b) for a, b in zip(fused_alone, fused_together, strict=True)), (
        "the fused GEMMs are batch-invariant here anyway: this test lost its power"
    )


def test_the_skip_last_guidance_preset_is_cfg_1_on_the_last_scale(pipe):
    """The preset is the per-scale list it stands for (same bits), and it differs from full guidance."""
    n = SCHEDULE.num_scales
    assert SamplingParams(cfg=4.0, guidance="skip-last").for_schedule(n).cfg == (4.0,) * (n - 1) + (1.0,)
    assert SamplingParams(cfg=(2.0,) * n, guidance="skip-last").for_schedule(n).cfg == (2.0,) * (n - 1) + (1.0,)
    assert SamplingParams(cfg=4.0).for_schedule(n) == SamplingParams(cfg=4.0)
    with pytest.raises(ValueError, match="guidance"):
        SamplingParams(guidance="none")  # type: ignore[arg-type]
    prompts = ["a red circle", "two blue squares"]
    preset = pipe.generate(prompts, SCHEDULE, SamplingParams(cfg=4.0, tau=1.0, seed=5, guidance="skip-last"))
    listed = pipe.generate(prompts, SCHEDULE, SamplingParams(cfg=(4.0,) * (n - 1) + (1.0,), tau=1.0, seed=5))
    full = pipe.generate(prompts, SCHEDULE, SamplingParams(cfg=4.0, tau=1.0, seed=5))
    assert all(np.array_equal(a, b) for a, b in zip(preset.bits, listed.bits, strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(preset.bits[:-1], full.bits[:-1], strict=True))
    assert not np.array_equal(preset.bits[-1], full.bits[-1])


def test_the_vae_decode_mode_reaches_the_vae(t5_dir, tiny_transformer, tiny_vae):
    import copy

    def build(mode):
        runtime = RuntimeConfig(vae_decode=mode)
        return InfinityPipeline(
            copy.deepcopy(tiny_transformer), copy.deepcopy(tiny_vae), T5TextEncoder.from_dir(t5_dir), runtime
        )

    fast, reference = build("fast"), build("reference")
    assert RuntimeConfig().vae_decode == "fast"
    assert fast.vae._fast_decoder is not None and reference.vae._fast_decoder is None
    a = fast.generate(["a star"], SCHEDULE, SamplingParams(seed=1))
    b = reference.generate(["a star"], SCHEDULE, SamplingParams(seed=1))
    assert all(np.array_equal(x, y) for x, y in zip(a.bits, b.bits, strict=True))
    assert np.abs(a.images[0].astype(int) - b.images[0].astype(int)).max() <= 1
