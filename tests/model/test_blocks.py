"""model/blocks.py at tiny sizes: shapes, the official block maths (fact sheet 3.2-3.3), masks, the cache
path and batch invariance."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.attention import TextMemory, block_causal_mask
from model.blocks import (
    FFN,
    LOG_MAX_SCALE_MUL,
    AdaLNBeforeHead,
    CrossAttention,
    CrossAttnBlock,
    PoolingAttention,
    RMSNorm,
    SelfAttention,
)
from model.kv_cache import KVCache
from model.rope import rope_table
from model.schedules import ScaleSchedule
from tests.conftest import perturbed

WIDTH, HEADS, HIDDEN, EPS = 32, 2, 64, 1e-6
SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2), (3, 3)))  # 14 tokens in 3 scales
L = SCHEDULE.total_tokens
ROPE = rope_table(SCHEDULE, WIDTH // HEADS, "cpu")
MASK = block_causal_mask(SCHEDULE.lengths, torch.device("cpu"))


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _text(lengths, channels=WIDTH, seed=1) -> TextMemory:
    """Padded text of the given lengths; padding is zero, as a real TextMemory's."""
    lengths = torch.tensor(lengths)
    feats = _randn(len(lengths), int(lengths.max()), channels, seed=seed)
    return TextMemory(feats * (torch.arange(feats.shape[1])[None, :, None] < lengths[:, None, None]), lengths)


def _block(width=WIDTH, heads=HEADS, hidden=HIDDEN, seed=0) -> CrossAttnBlock:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return perturbed(CrossAttnBlock(width, heads, hidden, EPS), seed)


def _ca_kv(block: CrossAttnBlock, memory: TextMemory) -> tuple[torch.Tensor, torch.Tensor]:
    """Text K/V as Infinity.cross_kv makes them: batch-invariant, each row at its own length, zero-padded."""
    if not block.ca.batch_invariant:
        return block.ca.project_memory(memory.features)
    T = memory.features.shape[1]
    pairs = [block.ca.project_memory(memory.features[i : i + 1, :n]) for i, n in enumerate(memory.lengths.tolist())]
    return tuple(torch.cat([F.pad(p[j], (0, 0, 0, T - p[j].shape[2])) for p in pairs]) for j in range(2))


def _invariant(block: CrossAttnBlock, enabled: bool) -> CrossAttnBlock:
    """A block is a plain module: its GEMM-carrying parts hold the switch (Infinity sets them all)."""
    for m in (block.sa, block.ca, block.ffn):
        m.set_batch_invariant(enabled)
    return block


def _run(block, x, ada, memory, mask=MASK, rope=ROPE, cache=None):
    return block(x, ada, _ca_kv(block, memory), memory, rope, "sdpa", mask=mask, cache=cache)


# ---- shapes -----------------------------------------------------------------------------------
def test_self_attention_maps_tokens_to_tokens():
    sa = perturbed(SelfAttention(WIDTH, HEADS), 0)
    assert (sa.num_heads, sa.head_dim) == (HEADS, WIDTH // HEADS)
    assert sa.scale_mul_1H11.shape == (1, HEADS, 1, 1)
    out = sa(_randn(3, L, WIDTH), ROPE, MASK)
    assert out.shape == (3, L, WIDTH) and out.dtype == torch.float32 and out.isfinite().all()


def test_cross_attention_projects_text_once_and_maps_tokens_to_tokens():
    ca = perturbed(CrossAttention(WIDTH, HEADS), 0)
    memory = _text([5, 2])
    k, v = ca.project_memory(memory.features)
    assert k.shape == v.shape == (2, HEADS, 5, WIDTH // HEADS)
    out = ca(_randn(2, 7, WIDTH), (k, v), memory, "sdpa")
    assert out.shape == (2, 7, WIDTH) and out.isfinite().all()


def test_ffn_is_fc1_gelu_tanh_fc2():
    ffn = perturbed(FFN(WIDTH, HIDDEN), 0)
    x = _randn(2, 5, WIDTH)
    expected = ffn.fc2(F.gelu(ffn.fc1(x), approximate="tanh"))
    out = ffn(x)
    assert out.shape == (2, 5, WIDTH)
    torch.testing.assert_close(out, expected)


def test_block_keeps_a_float32_residual_stream_also_with_bf16_weights():
    block = _block().bfloat16()
    out = _run(block, _randn(2, L, WIDTH), _randn(2, 1, 6, WIDTH, seed=2) * 0.1, _text([4, 3]))
    assert out.shape == (2, L, WIDTH) and out.dtype == torch.float32 and out.isfinite().all()


# ---- the official block maths -----------------------------------------------------------------
def test_ada_slots_are_sa_gate_ffn_gate_sa_scale_ffn_scale_sa_shift_ffn_shift():
    """With both gates at zero, the block is x + CA(ca_norm(x)): cross-attention has no gate, and the
    four scale/shift slots reach nothing else. Each gate alone opens exactly its own branch."""
    block, x, memory = _block(), _randn(2, L, WIDTH), _text([4, 3])
    base = _randn(2, 1, 6, WIDTH, seed=3) * 0.3
    closed = base - block.ada_gss.detach()
    closed[:, :, :2] = -block.ada_gss.detach()[:, :, :2]  # ada_gss + ada = 0 in slots 0, 1

    with torch.no_grad():
        out = _run(block, x, closed, memory)
        h = F.layer_norm(x, (WIDTH,), block.ca_norm.weight, block.ca_norm.bias, EPS)
        torch.testing.assert_close(out, x + block.ca(h, _ca_kv(block, memory), memory, "sdpa"))
        for slot in (2, 3, 4, 5):  # no gate open: scales/shifts do nothing
            other = closed.clone()
            other[:, :, slot] += 1.0
            torch.testing.assert_close(_run(block, x, other, memory), out, atol=0, rtol=0)
        sa_open, ffn_open = closed.clone(), closed.clone()
        sa_open[:, :, 0] += 1.0
        ffn_open[:, :, 1] += 1.0
        reach = {}
        for name, ada in (("sa", sa_open), ("ffn", ffn_open)):
            ref = _run(block, x, ada, memory)
            reach[name] = set()
            for slot in (2, 3, 4, 5):
                other = ada.clone()
                other[:, :, slot] += 1.0
                if not torch.equal(_run(block, x, other, memory), ref):
                    reach[name].add(slot)
    assert reach == {"sa": {2, 4}, "ffn": {3, 5}}


def test_self_attention_is_cosine_attention():
    """q and k are l2-normalised, so scaling the input only scales the output (no biases)."""
    sa = perturbed(SelfAttention(WIDTH, HEADS), 0)
    with torch.no_grad():
        for p in (sa.q_bias, sa.v_bias, sa.proj.bias):
            p.zero_()
        x = _randn(2, L, WIDTH)
        torch.testing.assert_close(sa(x * 7.0, ROPE, MASK), 7.0 * sa(x, ROPE, MASK), atol=1e-5, rtol=1e-5)


def test_the_per_head_scale_is_clamped_at_100():
    assert pytest.approx(math.log(100), abs=1e-6) == LOG_MAX_SCALE_MUL
    sa = perturbed(SelfAttention(WIDTH, HEADS), 0)
    x = _randn(1, L, WIDTH)
    with torch.no_grad():
        sa.scale_mul_1H11.fill_(LOG_MAX_SCALE_MUL)
        at_bound = sa(x, ROPE, MASK)
        sa.scale_mul_1H11.fill_(9.0)
        assert torch.equal(sa(x, ROPE, MASK), at_bound)
        sa.scale_mul_1H11.fill_(math.log(4.0))  # the official init
        assert not torch.equal(sa(x, ROPE, MASK), at_bound)


def test_rms_norm_and_head_modulation_formulas():
    norm = perturbed(RMSNorm(WIDTH), 0)
    x = _randn(3, 5, WIDTH)
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)
    head = perturbed(AdaLNBeforeHead(WIDTH, EPS), 0)
    pooled = _randn(3, WIDTH, seed=1)
    modulation = head.modulation(pooled)
    assert modulation.shape == (3, 1, 2, WIDTH)
    torch.testing.assert_close(modulation.flatten(1), head.ada_lin[1](F.silu(pooled)))
    scale, shift = modulation[:, :, 0], modulation[:, :, 1]  # slot 0 scale, slot 1 shift
    torch.testing.assert_close(head(x, modulation), F.layer_norm(x, (WIDTH,), eps=EPS) * (1 + scale) + shift)


def test_pooling_gives_one_vector_per_prompt_and_ignores_padding():
    pool = perturbed(PoolingAttention(16, WIDTH, 1), 0)
    memory = _text([5, 2], channels=16)
    out = pool(memory, "sdpa")
    assert out.shape == (2, WIDTH)
    feats = memory.features.clone()
    feats[1, 2:] = 100.0
    torch.testing.assert_close(pool(TextMemory(feats, memory.lengths), "sdpa"), out)
    alone = pool(TextMemory(memory.features[1:, :2], memory.lengths[1:]), "sdpa")
    torch.testing.assert_close(alone[0], out[1], atol=1e-6, rtol=1e-6)


# ---- masks and the KV cache -------------------------------------------------------------------
@pytest.mark.parametrize("invariant", [False, True])
def test_block_causal_mask_hides_later_scales(invariant):
    block = _invariant(_block(), invariant)
    x, ada, memory = _randn(2, L, WIDTH), _randn(2, 1, 6, WIDTH, seed=2) * 0.3, _text([4, 3])
    out = _run(block, x, ada, memory)
    last = SCHEDULE.offsets[-1]
    changed = x.clone()
    changed[:, last:] += 5.0  # the last scale only
    out2 = _run(block, changed, ada, memory)
    assert torch.equal(out2[:, :last], out[:, :last])  # earlier scales never see it
    assert not torch.equal(out2[:, last:], out[:, last:])
    one = x.clone()
    one[:, 2] += 5.0  # one token of scale 1 (tokens 1..4)
    out3 = _run(block, one, ada, memory)
    assert torch.equal(out3[:, :1], out[:, :1])
    assert all(not torch.equal(out3[:, t], out[:, t]) for t in range(1, L))  # its own scale and later ones


def test_scale_by_scale_with_the_cache_equals_the_masked_forward():
    block = _block()
    x, ada, memory = _randn(2, L, WIDTH), _randn(2, 1, 6, WIDTH, seed=2) * 0.3, _text([4, 3])
    full = _run(block, x, ada, memory)
    cache = KVCache.allocate(1, 2, HEADS, L, WIDTH // HEADS, torch.float32, "cpu")
    for start, n in zip(SCHEDULE.offsets, SCHEDULE.lengths, strict=True):
        step = _run(
            block, x[:, start : start + n], ada, memory, mask=None, rope=ROPE[:, start : start + n], cache=cache
        )
        cache.advance(n)
        torch.testing.assert_close(step, full[:, start : start + n], atol=1e-6, rtol=1e-6)
    assert cache.filled == L


# ---- batch invariance -------------------------------------------------------------------------
def test_every_gemm_module_of_a_block_carries_its_own_switch():
    block = _block()
    assert not any(m.batch_invariant for m in (block.sa, block.ca, block.ffn))  # built as training wants
    assert block.sa.set_batch_invariant(True) is block.sa
    assert block.sa.batch_invariant and not block.ca.batch_invariant and not block.ffn.batch_invariant


def _mixed_batch(width):
    """Row 1 of a 4-row batch is the target row; the others have other tokens, modulation and text."""
    x, ada = _randn(4, L, width, seed=5), _randn(4, 1, 6, width, seed=6) * 0.3
    memory = _text([6, 3, 2, 5], channels=width, seed=7)
    target = (x[1:2], ada[1:2], TextMemory(memory.features[1:2, :3], memory.lengths[1:2]))
    return (x, ada, memory), target


def test_a_row_gets_the_same_bits_alone_and_in_a_batch_when_batch_invariant():
    # Width 256 / FFN 1024: large enough for the GEMM library to choose kernels by the row count.
    block = _block(width=256, heads=4, hidden=1024)
    rope = rope_table(SCHEDULE, 64, "cpu")
    batch, target = _mixed_batch(256)
    _invariant(block, True)
    with torch.no_grad():
        together = _run(block, *batch, rope=rope)
        alone = _run(block, *target, rope=rope)
    assert torch.equal(alone[0], together[1])


def test_the_per_row_and_the_fused_paths_agree_closely():
    block = _block(width=256, heads=4, hidden=1024)
    rope = rope_table(SCHEDULE, 64, "cpu")
    batch, _ = _mixed_batch(256)
    with torch.no_grad():
        fused = _run(block, *batch, rope=rope)
        per_row = _run(_invariant(block, True), *batch, rope=rope)
    torch.testing.assert_close(per_row, fused, atol=1e-5, rtol=1e-5)
