import time
from dataclasses import replace

import pytest
import torch

from model.attention import TextMemory
from model.config import TRANSFORMER_SIZES, VAE_SIZES, SamplingParams, VAEConfig
from model.quantizer import BitwiseQuantizer
from model.sampler import filter_bit_logits, guide, sample, sample_bits
from model.schedules import ScaleSchedule
from model.transformer import Infinity
from tests.conftest import make_transformer

SCHEDULE = ScaleSchedule.official(1.0, "0.06M")
QUANT = BitwiseQuantizer(VAE_SIZES["tiny"])


class RecordingInfinity(Infinity):
    """The real model; remembers the raw logits of each cached step."""

    def step(self, *args, **kwargs):
        out = super().step(*args, **kwargs)
        self.recorded.append(out)
        return out


@pytest.fixture(scope="module")
def model() -> RecordingInfinity:
    base = make_transformer(TRANSFORMER_SIZES["tiny"])
    m = RecordingInfinity(base.config)
    m.load_state_dict(base.state_dict())
    m.recorded = []
    return m.eval().set_batch_invariant(True)  # as a pipeline runs it by default


def text(lengths, seed=0, channels=32) -> TextMemory:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    feats = torch.randn(len(lengths), int(lengths.max()), channels, generator=g)
    feats = feats * (torch.arange(feats.shape[1])[None, :, None] < lengths[:, None, None])
    return TextMemory(feats, lengths)


def run(model, memory, params, schedule=SCHEDULE, quant=QUANT, uncond=None):
    model.recorded = []
    gens = [torch.Generator().manual_seed(p.seed if p.seed is not None else 0) for p in params]
    uncond = uncond if uncond is not None else model.unconditional_text(memory.lengths)
    with torch.inference_mode():
        return sample(model, quant, schedule, memory, uncond, params, gens, "sdpa")


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_cached_logits_equal_teacher_forced_logits(model, cfg):
    memory = text([5, 3])
    params = [SamplingParams(cfg=cfg, tau=1.0, seed=s) for s in (1, 2)]
    out = run(model, memory, params)
    bits = [b.long() for b in out.bits]
    inputs = QUANT.teacher_inputs(bits, SCHEDULE.vae_scales(False))
    with torch.inference_mode():
        forced = model(model.condition(memory), SCHEDULE, inputs)
        forced_uncond = model(model.condition(model.unconditional_text(memory.lengths)), SCHEDULE, inputs)
    for si, (cached, tf) in enumerate(zip(model.recorded, forced, strict=True)):
        torch.testing.assert_close(cached[:2], tf, atol=2e-5, rtol=1e-5, msg=f"scale {si}")
        if cfg != 1.0:
            torch.testing.assert_close(cached[2:], forced_uncond[si], atol=2e-5, rtol=1e-5)


def test_cached_and_teacher_forced_agree_under_patchify():
    config = replace(TRANSFORMER_SIZES["tiny"], token_bits=16)
    m = RecordingInfinity(config).eval()
    m.recorded = []
    quant = BitwiseQuantizer(VAE_SIZES["tiny-patchify"])
    memory = text([4])
    out = run(m, memory, [SamplingParams(cfg=1.0, tau=1.0, seed=0)], quant=quant)
    assert out.bits[-1].shape == (1, 32, 32, 4)  # latent layout: 2x the token grid
    inputs = quant.teacher_inputs([b.long() for b in out.bits], SCHEDULE.vae_scales(True))
    with torch.inference_mode():
        forced = m(m.condition(memory), SCHEDULE, inputs)
    for cached, tf in zip(m.recorded, forced, strict=True):
        torch.testing.assert_close(cached, tf, atol=2e-5, rtol=1e-5)


def test_a_seed_gives_the_same_bits_whatever_shares_its_batch(model):
    alone = run(model, text([4], seed=7), [SamplingParams(seed=123)])
    mixed_text = text([6, 4, 2], seed=9)
    target = text([4], seed=7)
    feats = mixed_text.features.clone()
    feats[1] = 0
    feats[1, :4] = target.features[0]
    batch = TextMemory(feats, mixed_text.lengths)
    params = [
        SamplingParams(seed=5, cfg=1.0),
        SamplingParams(seed=123),
        SamplingParams(seed=9, cfg=5.0, tau=1.0, top_k=1),
    ]
    together = run(model, batch, params)
    for a, b in zip(alone.bits, together.bits, strict=True):
        assert torch.equal(a[0], b[1])
    torch.testing.assert_close(alone.latent[0], together.latent[1], atol=0, rtol=0)


def test_greedy_does_not_depend_on_the_seed(model):
    memory = text([5])
    a = run(model, memory, [SamplingParams(top_k=1, seed=1)])
    b = run(model, memory, [SamplingParams(top_k=1, seed=2)])
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits, strict=True))
    c = run(model, memory, [SamplingParams(tau=1.0, seed=1)])
    d = run(model, memory, [SamplingParams(tau=1.0, seed=2)])
    assert not all(torch.equal(x, y) for x, y in zip(c.bits, d.bits, strict=True))


def test_per_scale_cfg_and_tau(model):
    memory = text([5])
    per_scale = SamplingParams(cfg=(3.0,) * 7, tau=(0.5,) * 7, seed=4)
    scalar = SamplingParams(cfg=3.0, tau=0.5, seed=4)
    a, b = run(model, memory, [per_scale]), run(model, memory, [scalar])
    assert all(torch.equal(x, y) for x, y in zip(a.bits, b.bits, strict=True))
    # A short list is refused by InfinityPipeline.generate, the Python boundary (tests/model/test_pipeline.py).


def official_top_k_top_p(logits, top_k, top_p):
    """The official sort-based filter, rewritten here as an independent reference."""
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, 2), dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, idx = logits.sort(dim=-1)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(1, idx, remove), float("-inf"))
    return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 0.97), (1, 0.97), (2, 0.9), (0, 0.0), (900, 0.5)])
def test_bit_filter_matches_the_official_sort_based_filter(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(5000, 2, generator=g) * 4
    pairs[:10] = torch.tensor([2.0, 2.0])  # exact ties
    assert torch.equal(filter_bit_logits(pairs, top_k, top_p), official_top_k_top_p(pairs, top_k, top_p))


@pytest.mark.parametrize("cfg", [3.0, 1.0])  # guided (cond and uncond rows) and unguided
def test_rows_dropped_between_scales_leave_the_others_unchanged(model, cfg):
    memory = text([5, 4, 3], seed=11)
    params = [SamplingParams(seed=s, tau=1.0, cfg=cfg) for s in (1, 2, 3)]
    full = run(model, memory, params)
    seen = []

    def drop_row_one_after_scale_two(event):
        seen.append(event)
        return {1} if event.scale_index == 2 else None

    model.recorded = []
    gens = [torch.Generator().manual_seed(p.seed) for p in params]
    start = time.perf_counter()
    with torch.inference_mode():
        part = sample(
            model,
            QUANT,
            SCHEDULE,
            memory,
            model.unconditional_text(memory.lengths),
            params,
            gens,
            "sdpa",
            on_scale=drop_row_one_after_scale_two,
        )
    wall = time.perf_counter() - start
    assert part.rows == (0, 2)
    assert seen[2].rows == (0, 1, 2) and seen[3].rows == (0, 2)
    assert model.recorded[3].shape[0] == (4 if cfg != 1.0 else 2)  # 2 rows (x cond, uncond) after the drop
    for a, b in zip(full.bits, part.bits, strict=True):
        assert torch.equal(a[[0, 2]], b)
    assert all(b.dtype == torch.uint8 for b in part.bits)
    # what each event reports: its scale of all, the codes so far, the scale's own seconds
    assert [(e.scale_index, e.num_scales) for e in seen] == [(i, 7) for i in range(7)]
    assert torch.equal(seen[-1].latent, part.latent) and torch.equal(seen[-1].latent, full.latent[[0, 2]])
    assert [e.seconds for e in seen] == part.scale_seconds
    assert all(s > 0 for s in part.scale_seconds) and sum(part.scale_seconds) <= wall
    with torch.inference_mode():
        none = sample(
            model,
            QUANT,
            SCHEDULE,
            memory,
            model.unconditional_text(memory.lengths),
            params,
            gens,
            "sdpa",
            on_scale=lambda e: {0, 1, 2},
        )
    assert none.rows == () and len(none.bits) == 1


def test_bf16io_backend_rounds_like_flash_attn():
    from model.attention import cross_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    memory = TextMemory(torch.zeros(2, 5, 1), torch.tensor([5, 3]))
    exact = cross_attention(q, k, v, memory, "sdpa", batch_invariant=True)
    rounded = cross_attention(q, k, v, memory, "sdpa-bf16io", batch_invariant=True)
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, rounded.bfloat16().float())  # outputs are bf16 values
    assert not torch.equal(rounded, exact)
    torch.testing.assert_close(rounded, exact, atol=2e-2, rtol=2e-2)
    # row 1 sees only its 3 text tokens
    torch.testing.assert_close(
        exact[1], torch.nn.functional.scaled_dot_product_attention(q[1], k[1, :, :3], v[1, :, :3])
    )


@pytest.mark.parametrize("invariant", [True, False])
def test_logits_of_a_row_do_not_depend_on_its_batch_at_realistic_widths(invariant):
    # Width 256 / FFN 1024 / text 64: large enough for the GEMM library to choose kernels by the
    # number of rows. Each cached step's logits of the shared row must be bit-identical.
    config = replace(TRANSFORMER_SIZES["tiny"], width=256, num_heads=4, ffn_hidden=1024, text_channels=64)
    recording = RecordingInfinity(config)  # built as training builds it: batch invariance off
    recording.load_state_dict(make_transformer(config).state_dict())
    recording.eval().recorded = []
    if invariant:
        recording.set_batch_invariant(True)
    target = text([4], seed=7, channels=64)
    others = text([9, 4, 2, 6], seed=9, channels=64)
    feats = others.features.clone()
    feats[1] = 0
    feats[1, :4] = target.features[0]
    batch = TextMemory(feats, others.lengths)
    params = [SamplingParams(seed=s) for s in (5, 123, 9, 11)]
    run(recording, target, [SamplingParams(seed=123)])
    alone = recording.recorded
    run(recording, batch, params)
    together = recording.recorded
    same = all(torch.equal(a[0], b[1]) for a, b in zip(alone, together, strict=True))  # row 0 alone, row 1 in the batch
    if invariant:
        assert same
    else:
        assert not same, "the GEMMs are batch-invariant here even without the switch: this test lost its power"


def test_quarantine_zeroes_only_the_rows_with_a_non_finite_logit():
    from model.sampler import quarantine_nonfinite

    logits = torch.randn(4, 3, 8)
    logits[1, 2, 5] = float("inf")
    logits[3, 0, 0] = float("nan")
    cleaned, bad = quarantine_nonfinite(logits)
    assert bad.tolist() == [False, True, False, True]
    assert torch.equal(cleaned[[0, 2]], logits[[0, 2]])  # healthy rows untouched, bit for bit
    assert torch.equal(cleaned[[1, 3]], torch.zeros(2, 3, 8))  # poisoned rows sample uniform noise


# Guidance rows as the official sampler meets them: per-scale lists and scalars, cfg 1 beside cfg != 1, tau != 1.
GUIDE_ROWS = [
    SamplingParams(cfg=(1.5, 3.0, 4.0), tau=(0.5, 0.7, 1.3)),
    SamplingParams(cfg=2.5, tau=0.3),
    SamplingParams(cfg=1.0, tau=(0.9, 1.1, 0.6)),
]


@pytest.mark.parametrize("scale_index", [0, 1, 2])
def test_guidance_is_temperature_then_cfg_as_the_paper_writes_it(scale_index):
    """guide() against the formula, computed here independently: for row b at scale k,
    l = cfg_k * l_cond / tau_k + (1 - cfg_k) * l_uncond / tau_k (conditional rows first)."""
    B = len(GUIDE_ROWS)
    logits = torch.randn(2 * B, 5, 16, generator=torch.Generator().manual_seed(scale_index)) * 3
    got = guide(logits, GUIDE_ROWS, scale_index, guided=True)
    assert got.shape == (B, 5, 16)
    for b, p in enumerate(GUIDE_ROWS):
        cfg, tau = p.cfg_at(scale_index), p.tau_at(scale_index)
        cond, uncond = logits[b].double(), logits[B + b].double()
        formula = cfg * cond / tau + (1 - cfg) * uncond / tau  # float64: the maths
        torch.testing.assert_close(got[b].double(), formula, atol=1e-5, rtol=1e-6, msg=f"row {b}")
        # and the official float32 rounding: logits.mul(1 / tau), then the mix with Python-float weights
        scaled = logits.mul(1 / tau)
        assert torch.equal(got[b], cfg * scaled[b] + (1 - cfg) * scaled[B + b]), f"row {b}"


@pytest.mark.parametrize("scale_index", [0, 1, 2])
def test_without_guidance_only_the_temperature_applies(scale_index):
    rows = [SamplingParams(cfg=1.0, tau=(0.5, 0.7, 1.3)), SamplingParams(cfg=1.0, tau=0.3)]
    logits = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(10 + scale_index)) * 3
    got = guide(logits, rows, scale_index, guided=False)
    for b, p in enumerate(rows):
        tau = p.tau_at(scale_index)
        torch.testing.assert_close(got[b].double(), logits[b].double() / tau, atol=1e-5, rtol=1e-6)
        assert torch.equal(got[b], logits[b].mul(1 / tau))


def bit_logits(bits: torch.Tensor, margin: float) -> torch.Tensor:
    """Bits (B, l, D) -> logits (B, l, 2D) whose pair (2j, 2j+1) = (logit of 0, logit of 1) favours bit j."""
    pairs = torch.stack(((1 - bits) * margin, bits * margin), dim=-1).float()  # (B, l, D, 2)
    return pairs.flatten(2)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_k=1, seed=0), SamplingParams(top_p=0.97, seed=0), SamplingParams(top_k=2, top_p=0.97, seed=1)],
)
def test_bit_j_of_a_token_is_drawn_from_logit_columns_2j_and_2j_plus_1(params):
    # margin 5: the minority value has probability 0.0067 <= 0.03, which top-p 0.97 removes: no chance left
    bits = torch.randint(0, 2, (2, 6, 8), generator=torch.Generator().manual_seed(3))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    assert torch.equal(sample_bits(bit_logits(bits, 5.0), [params, params], gens), bits)


def test_greedy_breaks_an_exact_tie_towards_bit_zero():
    logits = torch.zeros(1, 4, 16)
    logits[0, 0, 1] = 1.0  # one decided bit: token 0, bit 0 -> 1
    out = sample_bits(logits, [SamplingParams(top_k=1)], [torch.Generator().manual_seed(0)])
    expected = torch.zeros(1, 4, 8, dtype=torch.long)
    expected[0, 0, 0] = 1
    assert torch.equal(out, expected)


@pytest.mark.parametrize("top_k", [0, 2])
def test_sampled_bits_follow_the_softmax_of_their_pair(top_k):
    """Unfiltered (top_p 0): P(bit = 1) = softmax(pair)[1], each row at its own probability."""
    n = 4000
    p_one = torch.tensor([0.75, 0.2])  # row 0, row 1
    logits = torch.zeros(2, n, 2)
    logits[:, :, 1] = torch.log(p_one / (1 - p_one))[:, None]  # (logit of 0, logit of 1) = (0, log-odds)
    params = [SamplingParams(top_k=top_k, top_p=0.0)] * 2
    gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
    freq = sample_bits(logits, params, gens).float().mean(dim=(1, 2))
    # 5 standard deviations of a mean of 4000 draws at p = 0.75 (the wider row): 0.034, plus 0.001
    torch.testing.assert_close(freq, p_one, atol=5 * (0.25 * 0.75 / n) ** 0.5 + 1e-3, rtol=0)


def test_the_draw_is_one_multinomial_per_row_on_its_own_generator():
    """A seed's bits are pinned to the official call: torch.multinomial(probs, 1, replacement=True) over the
    row's filtered (N, 2) probabilities, on the row's generator (the official run: one call, one row)."""
    logits = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(5)) * 2
    params = [SamplingParams(), SamplingParams(top_p=0.0)]  # top-p 0.97 active, and off
    out = sample_bits(logits, params, [torch.Generator().manual_seed(s) for s in (11, 12)])
    for b, (p, seed) in enumerate(zip(params, (11, 12), strict=True)):
        probs = official_top_k_top_p(logits[b].reshape(-1, 2), p.top_k, p.top_p).softmax(dim=-1)
        draw = torch.multinomial(probs, 1, replacement=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out[b].flatten(), draw[:, 0]), f"row {b}"


@pytest.mark.parametrize("top_p", [0.97, 0.9])
def test_the_top_p_threshold_is_compared_in_the_logits_precision(top_p):
    """float64 logits whose minority probability lies between float32(1 - top_p) and the float64 value:
    the official `cumsum <= 1 - top_p` decides them in float64, so a float32 threshold would decide wrong."""
    lo, hi = sorted((float(torch.tensor(1 - top_p, dtype=torch.float32)), 1 - top_p))
    p = torch.linspace(lo, hi, 7, dtype=torch.float64)[1:-1]
    pairs = torch.stack((p.log(), (-p).log1p()), dim=-1)  # softmax = (p, 1 - p)
    assert ((pairs.softmax(dim=-1)[:, 0] > lo) & (pairs.softmax(dim=-1)[:, 0] < hi)).all()
    assert torch.equal(filter_bit_logits(pairs, 0, top_p), official_top_k_top_p(pairs, 0, top_p))


def test_a_row_that_went_non_finite_at_any_scale_is_reported(model, monkeypatch):
    step = model.step

    def poisoned(x, scale_index, *args):
        out = step(x, scale_index, *args)
        if scale_index == 1:  # row 0's conditional logits, at one scale only
            out = out.clone()
            out[0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(model, "step", poisoned)
    out = run(model, text([5, 4]), [SamplingParams(seed=1), SamplingParams(seed=2)])
    assert out.rows == (0, 1) and out.nonfinite == (0,)


def test_the_backend_reaches_the_conditioning_and_every_step_and_the_cache_takes_the_blocks_dtype(monkeypatch):
    m = make_transformer(TRANSFORMER_SIZES["tiny"])
    m.blocks.to(torch.bfloat16)  # as a bfloat16 pipeline casts them
    condition, step, seen = m.condition, m.step, []

    def spy_condition(memory, backend="(none)"):
        seen.append(("condition", backend))
        return condition(memory, backend)

    def spy_step(x, scale_index, schedule, cond, ca_kv, cache, backend="(none)"):
        seen.append(("step", backend, cache.keys.dtype))
        return step(x, scale_index, schedule, cond, ca_kv, cache, backend)

    monkeypatch.setattr(m, "condition", spy_condition)
    monkeypatch.setattr(m, "step", spy_step)
    memory = text([4])
    with torch.inference_mode():
        sample(
            m,
            QUANT,
            SCHEDULE,
            memory,
            m.unconditional_text(memory.lengths),
            [SamplingParams(seed=0)],
            [torch.Generator().manual_seed(0)],
            "sdpa-bf16io",
        )
    assert set(seen) == {("condition", "sdpa-bf16io"), ("step", "sdpa-bf16io", torch.bfloat16)}
    assert len([c for c in seen if c[0] == "step"]) == SCHEDULE.num_scales


def test_sampled_latent_weighs_each_scale_by_the_code_decay(model):
    """With decaying codes (a CPU-trained VAE), the latent of a sample is its bits' decayed sum."""
    quant = BitwiseQuantizer(VAEConfig(bits=8, base_channels=32, channel_mult=(1, 2), code_decay=0.5))
    out = run(model, text([4]), [SamplingParams(seed=3)], quant=quant)
    torch.testing.assert_close(out.latent, quant.bits_to_latent([b.long() for b in out.bits], SCHEDULE.scales))
    plain = QUANT.bits_to_latent([b.long() for b in out.bits], SCHEDULE.scales)
    assert not torch.allclose(out.latent, plain)


def test_guidance_stops_once_cfg_is_1_for_every_remaining_scale_and_the_bits_stay(model, monkeypatch):
    """From the first scale where every row's cfg is 1 for the rest of the schedule, the batch runs the
    conditional rows only (half the work and KV cache); the unconditional logits had weight 0 there,
    so every bit is the one the full guided run draws."""
    n = SCHEDULE.num_scales
    late = (3.0,) * 3 + (1.0,) * (n - 3)
    params = [SamplingParams(seed=4, cfg=late, tau=0.7), SamplingParams(seed=5, cfg=(2.0,) * 2 + (1.0,) * (n - 2))]
    memory = text([5, 3], seed=2)
    lean = run(model, memory, params)
    rows = [len(r) for r in model.recorded]
    assert rows == [4, 4, 4] + [2] * (n - 3), rows  # guided (2B) while any row still guides, then B

    monkeypatch.setattr("model.sampler._RunningRows.stop_guidance", lambda self: None)
    full = run(model, memory, params)
    assert [len(r) for r in model.recorded] == [4] * n
    assert all(torch.equal(a, b) for a, b in zip(lean.bits, full.bits, strict=True))
    assert torch.equal(lean.latent, full.latent)
