"""Cross-attention: each row sees only its own text, on every path."""

import pytest
import torch

from model.attention import TextMemory, cross_attention, sdpa
from model.blocks import linear


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-bf16io"])
def test_masked_and_grouped_cross_attention_agree_and_ignore_padding(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 2, 5, 8, generator=g)
    k, v = torch.randn(3, 2, 6, 8, generator=g), torch.randn(3, 2, 6, 8, generator=g)
    lengths = torch.tensor([6, 2, 4])
    memory = TextMemory(torch.zeros(3, 6, 4), lengths)
    grouped = cross_attention(q, k, v, memory, backend, batch_invariant=True)
    masked = cross_attention(q, k, v, memory, backend, batch_invariant=False)  # training's path: one call
    torch.testing.assert_close(masked, grouped, atol=1e-5, rtol=1e-5)
    # garbage in the padding changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 2:], v2[1, :, 2:] = 1e3, -1e3
    torch.testing.assert_close(cross_attention(q, k2, v2, memory, backend, batch_invariant=False), masked)


def test_linear_under_autocast_computes_in_autocast_dtype_and_otherwise_in_the_weights_dtype():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 3, 8).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(layer, x, batch_invariant=False)
    assert out.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x, layer.weight.to(torch.bfloat16), layer.bias.to(torch.bfloat16))
    torch.testing.assert_close(out, expected)
    assert linear(layer, x, batch_invariant=False).dtype == torch.float32  # no autocast: the weights' dtype


def test_cpu_half_precision_attention_is_computed_in_float32_even_under_autocast():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g).to(torch.bfloat16) for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa(q, k, v, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.to(torch.bfloat16))


def official_float32_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """The official cross-attention with its bf16 casts removed: flash-attn's varlen call as the official
    code runs it on CPU (one torch SDPA per sample over exactly its own keys, softmax scale hd ** -0.5)."""
    hd = q.shape[-1]
    return torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], scale=hd**-0.5
            )
            for i, n in enumerate(lengths.tolist())
        ]
    )


def test_auto_picks_exact_sdpa_on_cpu_and_keeps_the_cuda_choice():
    import importlib.util

    from model.attention import choose_backend
    from model.config import RuntimeConfig

    assert RuntimeConfig().attention == "auto"
    assert choose_backend("auto", torch.device("cpu")) == "sdpa"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    assert choose_backend("auto", torch.device("cuda")) == ("flash" if has_flash else "sdpa-bf16io")
    assert choose_backend("sdpa-bf16io", torch.device("cpu")) == "sdpa-bf16io"  # still there, on request


@pytest.mark.parametrize("queries", [5, 1])  # cross-attention; the text pooling's one query
def test_the_default_cpu_attention_is_the_official_float32_math_bit_for_bit(queries):
    from model.attention import choose_backend
    from model.config import RuntimeConfig

    backend = choose_backend(RuntimeConfig().attention, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, queries, 32, generator=g)  # the tiny model's head width
    k, v = torch.randn(3, 2, 6, 32, generator=g), torch.randn(3, 2, 6, 32, generator=g)
    lengths = torch.tensor([6, 2, 4])
    out = cross_attention(q, k, v, TextMemory(torch.zeros(3, 6, 1), lengths), backend, batch_invariant=True)
    assert torch.equal(out, official_float32_cross_attention(q, k, v, lengths))
    rounded = cross_attention(q, k, v, TextMemory(torch.zeros(3, 6, 1), lengths), "sdpa-bf16io", batch_invariant=True)
    assert not torch.equal(rounded, out)  # the opt-in mode rounds: not the float32 math
