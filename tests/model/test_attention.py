"""Cross-attention: each row sees only its own text, on every path."""

import pytest
import torch

from model.attention import TextMemory, cross_attention, sdpa
from model.blocks import linear
from model.invariance import batch_invariance


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-bf16io"])
def test_masked_and_grouped_cross_attention_agree_and_ignore_padding(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=g)
    k, v = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    lengths = torch.tensor([6, 2, 4])
    memory = TextMemory(torch.zeros(3, 6, 4), lengths)
    with batch_invariance(True):
        grouped = cross_attention(q, k, v, memory, backend)
    with batch_invariance(False):                      # training's path: one masked call
        masked = cross_attention(q, k, v, memory, backend)
    torch.testing.assert_close(masked, grouped, atol=1e-5, rtol=1e-5)
    # garbage in the padding changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 2:], v2[1, :, 2:] = 1e3, -1e3
    with batch_invariance(False):
        torch.testing.assert_close(cross_attention(q, k2, v2, memory, backend), masked)


def test_linear_under_autocast_computes_in_autocast_dtype_and_otherwise_in_the_weights_dtype():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), batch_invariance(False):
        out = linear(layer, x)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x, layer.weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16))
    torch.testing.assert_close(out, expected)
    assert linear(layer, x).dtype == torch.float32            # no autocast: the weights' dtype


def test_cpu_half_precision_attention_is_computed_in_float32_even_under_autocast():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))
