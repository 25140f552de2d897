"""model/transformer.py on the tiny config: conditioning, teacher forcing, the cached step, the null prompt.

Sampling through the cache against teacher forcing (with real sampled bits, CFG and patchify) is in
test_sampler.py; the state-dict names against the official listings in tests/weights/test_keymap.py.
Here the transformer is driven directly with random token inputs.
"""

import math
from dataclasses import replace

import pytest
import torch

from model.attention import TextMemory
from model.config import TRANSFORMER_SIZES
from model.invariance import BatchInvariantModule
from model.kv_cache import KVCache
from model.schedules import ScaleSchedule
from model.transformer import Infinity, TextConditioning
from tests.conftest import make_transformer

CONFIG = TRANSFORMER_SIZES["tiny"]
C, BITS, CT = CONFIG.width, CONFIG.token_bits, CONFIG.text_channels
SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2), (3, 3), (4, 4)))  # 30 tokens in 4 scales


@pytest.fixture(scope="module")
def model() -> Infinity:
    return make_transformer(CONFIG)


def _text(lengths, seed=0) -> TextMemory:
    lengths = torch.tensor(lengths)
    feats = torch.randn(len(lengths), int(lengths.max()), CT, generator=torch.Generator().manual_seed(seed))
    return TextMemory(feats * (torch.arange(feats.shape[1])[None, :, None] < lengths[:, None, None]), lengths)


def _inputs(batch, schedule=SCHEDULE, seed=1) -> torch.Tensor:
    """Next-scale inputs of scales 1.. as the quantizer makes them: (B, L - 1, bits), values ~ +-1/sqrt(d)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, schedule.total_tokens - 1, BITS, generator=g) / math.sqrt(BITS)


def _cached(model, cond, schedule, inputs) -> list[torch.Tensor]:
    """Scale by scale through the KV cache, as the sampler drives it, with the given inputs."""
    B = cond.pooled.shape[0]
    cache = KVCache.allocate(
        CONFIG.depth, B, CONFIG.num_heads, schedule.total_tokens, CONFIG.head_dim, torch.float32, "cpu"
    )
    ca_kv, out = model.cross_kv(cond), []
    for si, (start, n) in enumerate(zip(schedule.offsets, schedule.lengths, strict=True)):
        x = model.start_tokens(cond) if si == 0 else model.embed_bits(inputs[:, start - 1 : start - 1 + n])
        out.append(model.step(x, si, schedule, cond, ca_kv, cache, "sdpa"))
    assert cache.filled == schedule.total_tokens
    return out


# ---- conditioning -----------------------------------------------------------------------------
def test_conditioning_shapes_and_the_shared_modulation(model):
    text = _text([5, 3])
    with torch.no_grad():
        cond = model.condition(text)
    assert cond.pooled.shape == (2, C) and cond.pooled.dtype == torch.float32
    assert cond.ada.shape == (2, 1, 6, C) and cond.head_ada.shape == (2, 1, 2, C)
    assert cond.memory.features.shape == (2, 5, C) and torch.equal(cond.memory.lengths, text.lengths)
    with torch.no_grad():
        torch.testing.assert_close(cond.ada.flatten(1), model.shared_ada_lin(cond.pooled))  # slot j = rows j*C..
        torch.testing.assert_close(cond.head_ada, model.head_nm.modulation(cond.pooled))
        torch.testing.assert_close(model.start_tokens(cond), cond.pooled[:, None] + model.pos_start)


def test_conditioning_ignores_what_lies_past_a_prompts_length(model):
    text = _text([5, 2])
    garbage = text.features.clone()
    garbage[1, 2:] = 50.0
    with torch.no_grad():
        a, b = model.condition(text), model.condition(TextMemory(garbage, text.lengths))
    torch.testing.assert_close(a.pooled, b.pooled)
    torch.testing.assert_close(a.memory.features[1, :2], b.memory.features[1, :2])


def test_select_keeps_the_rows_of_every_field(model):
    with torch.no_grad():
        cond = model.condition(_text([5, 3, 4]))
    part = cond.select([2, 0], torch.tensor([2, 0]))
    assert isinstance(part, TextConditioning)
    for field in ("pooled", "ada", "head_ada"):
        assert torch.equal(getattr(part, field), getattr(cond, field)[[2, 0]])
    assert part.memory.lengths.tolist() == [4, 5]
    assert part.memory.sizes == (4, 5)  # the host copy follows the rows, without a read back


# ---- the null prompt --------------------------------------------------------------------------
def test_the_unconditional_text_is_the_learned_matrix_cut_to_each_prompts_length(model):
    uncond = model.unconditional_text(torch.tensor([4, 2, 7]))
    assert uncond.features.shape == (3, 7, CT) and uncond.lengths.tolist() == [4, 2, 7]
    for row, n in enumerate((4, 2, 7)):
        assert torch.equal(uncond.features[row, :n], model.cfg_uncond[:n].detach())
    assert model.cfg_uncond.shape == (CONFIG.text_maxlen, CT)
    uncond.features[0, 0] += 1  # a copy: the parameter is safe
    assert torch.equal(model.unconditional_text(torch.tensor([1])).features[0], model.cfg_uncond[:1].detach())


def test_the_unconditional_init_is_the_official_one():
    model = Infinity(CONFIG)
    expected = torch.empty(CONFIG.text_maxlen, CT)
    torch.nn.init.trunc_normal_(expected, std=1.2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.cfg_uncond.detach(), expected / CT**0.5)


# ---- teacher forcing and the cached step ------------------------------------------------------
def test_teacher_forcing_gives_per_scale_logits(model):
    with torch.no_grad():
        logits = model(model.condition(_text([5, 3])), SCHEDULE, _inputs(2))
    assert [tuple(t.shape) for t in logits] == [(2, n, 2 * BITS) for n in SCHEDULE.lengths]
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in logits)


def test_teacher_forcing_refuses_inputs_of_the_wrong_length(model):
    with torch.no_grad(), pytest.raises(ValueError, match="29"):
        model(model.condition(_text([5])), SCHEDULE, _inputs(1)[:, :-1])


def test_a_scale_never_sees_later_scales(model):
    inputs = _inputs(2)
    changed = inputs.clone()
    changed[:, SCHEDULE.offsets[-1] - 1 :] += 1.0  # the last scale's inputs
    with torch.no_grad():
        cond = model.condition(_text([5, 3]))
        a, b = model(cond, SCHEDULE, inputs), model(cond, SCHEDULE, changed)
    assert all(torch.equal(x, y) for x, y in zip(a[:-1], b[:-1], strict=True))
    assert not torch.equal(a[-1], b[-1])


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_cached_step_logits_equal_teacher_forced_logits(model, batch_invariant):
    model.set_batch_invariant(batch_invariant)
    try:
        schedule = ScaleSchedule.custom(((1, 1), (2, 2), (4, 3), (8, 6)))  # non-square: rows and columns differ
        inputs = _inputs(3, schedule)
        with torch.no_grad():
            cond = model.condition(_text([5, 3, 1]))
            forced = model(cond, schedule, inputs)
            cached = _cached(model, cond, schedule, inputs)
    finally:
        model.set_batch_invariant(False)
    for si, (c, f) in enumerate(zip(cached, forced, strict=True)):
        torch.testing.assert_close(c, f, atol=1e-5, rtol=1e-5, msg=f"scale {si}")


def test_a_step_refuses_a_cache_at_the_wrong_offset(model):
    with torch.no_grad():
        cond = model.condition(_text([5]))
        cache = KVCache.allocate(
            CONFIG.depth, 1, CONFIG.num_heads, SCHEDULE.total_tokens, CONFIG.head_dim, torch.float32, "cpu"
        )
        x = model.embed_bits(_inputs(1)[:, :4])
        with pytest.raises(RuntimeError, match="starts at 1"):
            model.step(x, 1, SCHEDULE, cond, model.cross_kv(cond), cache, "sdpa")  # scale 0 never ran


def test_level_embedding_is_added_per_scale(model):
    x = torch.zeros(1, 4, C)
    assert torch.equal(model.add_level(x, 2), model.lvl_embed.weight[2].detach().expand(1, 4, C))
    assert model.embed_bits(_inputs(1)[:, :4]).shape == (1, 4, C)


# ---- edge cases -------------------------------------------------------------------------------
def test_a_one_scale_schedule_is_the_start_token_alone(model):
    schedule = ScaleSchedule.custom(((1, 1),))
    with torch.no_grad():
        cond = model.condition(_text([3, 2]))
        forced = model(cond, schedule, torch.zeros(2, 0, BITS))
        cached = _cached(model, cond, schedule, torch.zeros(2, 0, BITS))
    assert len(forced) == 1 and forced[0].shape == (2, 1, 2 * BITS)
    torch.testing.assert_close(cached[0], forced[0], atol=1e-6, rtol=1e-6)


def test_num_levels_bounds_the_number_of_scales():
    config = replace(CONFIG, num_levels=3)
    model = make_transformer(config)
    assert model.lvl_embed.weight.shape == (3, C)
    three = ScaleSchedule.custom(((1, 1), (2, 2), (3, 3)))
    with torch.no_grad():
        cond = model.condition(_text([2]))
        assert len(model(cond, three, _inputs(1, three))) == 3
        with pytest.raises((IndexError, ValueError)):
            model(cond, SCHEDULE, _inputs(1))  # 4 scales, 3 levels


# ---- batch invariance -------------------------------------------------------------------------
def test_the_switch_belongs_to_the_model_and_reaches_every_module():
    model = Infinity(CONFIG)
    switches = [m for m in model.modules() if isinstance(m, BatchInvariantModule)]
    assert len(switches) > 3 * CONFIG.depth and not any(m.batch_invariant for m in switches)
    assert model.set_batch_invariant(True) is model
    assert all(m.batch_invariant for m in switches)
    assert not Infinity(CONFIG).batch_invariant  # another model keeps its own


def test_a_prompt_is_conditioned_bit_for_bit_alike_alone_and_in_a_batch():
    # Width 256, text 64: large enough for the GEMM library to choose kernels by the number of rows.
    config = replace(CONFIG, width=256, num_heads=4, ffn_hidden=1024, text_channels=64)
    model = make_transformer(config).set_batch_invariant(True)
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([12, 3, 2, 6])  # padded to 12 rows: another GEMM kernel
    feats = torch.randn(4, 12, 64, generator=g) * (torch.arange(12)[None, :, None] < lengths[:, None, None])
    batch, alone = TextMemory(feats, lengths), TextMemory(feats[1:2, :3], lengths[1:2])
    with torch.no_grad():
        together, single = model.condition(batch), model.condition(alone)
        kv_together, kv_single = model.cross_kv(together), model.cross_kv(single)
        inputs = _inputs(4)
        logits_together = model(together, SCHEDULE, inputs)
        logits_single = model(single, SCHEDULE, inputs[1:2])
    for field in ("pooled", "ada", "head_ada"):
        assert torch.equal(getattr(together, field)[1], getattr(single, field)[0]), field
    assert torch.equal(together.memory.features[1, :3], single.memory.features[0])
    for (k1, v1), (k2, v2) in zip(kv_together, kv_single, strict=True):
        assert torch.equal(k1[1, :, :3], k2[0]) and torch.equal(v1[1, :, :3], v2[0])
    assert all(torch.equal(a[1], b[0]) for a, b in zip(logits_together, logits_single, strict=True))


def test_the_per_row_and_the_fused_conditioning_agree_closely(model):
    text = _text([6, 3, 2], seed=4)
    with torch.no_grad():
        fused = model.condition(text)
        model.set_batch_invariant(True)
        try:
            per_row = model.condition(text)
        finally:
            model.set_batch_invariant(False)
    for field in ("pooled", "ada", "head_ada"):
        torch.testing.assert_close(getattr(per_row, field), getattr(fused, field), atol=1e-5, rtol=1e-5)
    mask = torch.arange(6)[None, :, None] < text.lengths[:, None, None]
    torch.testing.assert_close(per_row.memory.features * mask, fused.memory.features * mask, atol=1e-5, rtol=1e-5)
