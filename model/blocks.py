"""Building blocks of the Infinity transformer, named as in the official state dict.

Precision rule (as the official bf16 run): the residual stream, every norm and the AdaLN
arithmetic are float32; Linear layers and attention run in the dtype of the block's weights.
Modules with GEMMs or cross-attention carry the model's batch-invariance switch (model/invariance.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import Backend, TextMemory, as_dtype, cross_attention, sdpa
from model.invariance import BatchInvariantModule, per_row_linear
from model.kv_cache import KVCache
from model.rope import apply_rope

# exp(scale_mul) is clamped at 100; the bound is the float32 log(100) the official code uses.
LOG_MAX_SCALE_MUL = float(torch.tensor(100.0).log())


def linear(
    layer: nn.Linear, x: torch.Tensor, bias: torch.Tensor | None = None, *, batch_invariant: bool
) -> torch.Tensor:
    """Apply `layer` in its weights' dtype (the caller's tensor may be float32), or under autocast
    (training) in autocast's dtype: casting to float32 weights first would only make autocast cast
    back, two copies of every activation for nothing. Batch-invariant: one GEMM per batch row."""
    w = layer.weight
    b = layer.bias if bias is None else bias
    if not torch.is_autocast_enabled(x.device.type):
        b = None if b is None else as_dtype(b, w.dtype)
        x = as_dtype(x, w.dtype)
    if batch_invariant and x.dim() >= 2:
        return per_row_linear(x, w, b)
    return F.linear(x, w, b)


def ada_layer_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift, all in float32. (B, L, C)"""
    return F.layer_norm(as_dtype(x, torch.float32), x.shape[-1:], eps=eps).mul(scale.add(1)).add_(shift)


def derived(
    owner: nn.Module, name: str, params: tuple[torch.Tensor, ...], make: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`make()`, a tensor computed from `params` alone (a fused bias, a clamped scale), kept on `owner` and
    reused while those parameters are unchanged: the scale loop runs every block once per scale, and
    rebuilding them dispatched a few ops per block each time. A parameter written in place (loading,
    an optimiser step: its version moves), moved or cast (another storage or dtype) is made afresh.
    With grad enabled (training) or under torch.compile nothing is kept: autograd and the compiler see
    the ops, as written."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return make()
    stamp = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device) for p in params)
    kept: dict[str, tuple[tuple, torch.Tensor, tuple]] = owner.__dict__.setdefault("_derived", {})
    hit = kept.get(name)
    if hit is None or hit[0] != stamp:
        # The entry holds the parameters and their storage: no new one can take their id or address.
        hit = kept[name] = (stamp, make(), tuple((p, p.detach()) for p in params))
    return hit[1]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = as_dtype(x, torch.float32)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight.float()


class SelfAttention(BatchInvariantModule):
    """Cosine self-attention (per-head learned scale) with RoPE-2D and an optional KV cache."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: (B, L, C); rope: (2, L, hd/2) for these tokens -> (B, L, C)"""
        B, L, C = x.shape
        qkv = linear(self.mat_qkv, x, self._qkv_bias(), batch_invariant=self.batch_invariant)
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, hd)
        f32 = torch.float32
        q = apply_rope(F.normalize(as_dtype(q, f32), dim=-1, eps=1e-12).mul(self._head_scale()), rope)
        k = apply_rope(F.normalize(as_dtype(k, f32), dim=-1, eps=1e-12), rope)
        out = _attend(as_dtype(q, v.dtype), as_dtype(k, v.dtype), v, mask, cache, layer)
        return linear(self.proj, out.transpose(1, 2).reshape(B, L, C), batch_invariant=self.batch_invariant)

    def _qkv_bias(self) -> torch.Tensor:
        """(3C,): q bias, no k bias, v bias."""
        q, v = self.q_bias, self.v_bias
        return derived(self, "qkv_bias", (q, v), lambda: torch.cat((q, torch.zeros_like(q), v)))

    def _head_scale(self) -> torch.Tensor:
        """(1, H, 1, 1) float32: exp of the learned log-scale, clamped at 100."""
        s = self.scale_mul_1H11
        return derived(self, "head_scale", (s,), lambda: s.float().clamp_max(LOG_MAX_SCALE_MUL).exp())


@torch.compiler.disable
def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None, layer: int
) -> torch.Tensor:
    """The KV-cache write and the attention kernel: left out of torch.compile (a compiled block would
    otherwise specialise on the layer index and the cache offset, and recompile for every pair)."""
    if cache is not None:
        k, v = cache.write(layer, k, v)  # (B, H, L_seen, hd)
    return sdpa(q, k, v, attn_mask=mask, scale=1.0)


class CrossAttention(BatchInvariantModule):
    """Queries from the image tokens, keys/values from the projected text (no qk-norm)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_q = nn.Linear(width, width)
        self.mat_kv = nn.Linear(width, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text K/V, computed once per request. memory: (B, T, C) -> k, v: (B, H, T, hd)"""
        B, T, _ = memory.shape
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        kv = linear(self.mat_kv, memory, bias, batch_invariant=self.batch_invariant)
        k, v = kv.view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], memory: TextMemory, backend: Backend
    ) -> torch.Tensor:
        B, L, C = x.shape
        invariant = self.batch_invariant
        q = linear(self.mat_q, x, batch_invariant=invariant).view(B, L, self.num_heads, self.head_dim)
        q = q.transpose(1, 2)
        out = cross_attention(q, kv[0], kv[1], memory, backend, batch_invariant=invariant)  # (B, H, L, hd)
        return linear(self.proj, out.transpose(1, 2).reshape(B, L, C), batch_invariant=invariant)


class FFN(BatchInvariantModule):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(linear(self.fc1, x, batch_invariant=self.batch_invariant), approximate="tanh")
        return linear(self.fc2, hidden, batch_invariant=self.batch_invariant)


class CrossAttnBlock(nn.Module):
    """AdaLN(SA) -> CA -> AdaLN(FFN), with shared AdaLN plus a per-block offset `ada_gss`."""

    def __init__(self, width: int, num_heads: int, ffn_hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        self.sa = SelfAttention(width, num_heads)
        self.ca = CrossAttention(width, num_heads)
        self.ffn = FFN(width, ffn_hidden)
        self.ca_norm = nn.LayerNorm(width, eps=eps)

    def forward(
        self,
        x: torch.Tensor,
        ada: torch.Tensor,
        ca_kv: tuple[torch.Tensor, torch.Tensor],
        memory: TextMemory,
        rope: torch.Tensor,
        backend: Backend,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x: (B, L, C) float32; ada: (B, 1, 6, C) float32 shared modulation -> (B, L, C) float32"""
        # Slot order of the 6-vector: SA gate, FFN gate, SA scale, FFN scale, SA shift, FFN shift.
        f32 = torch.float32
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (as_dtype(self.ada_gss, f32) + ada).unbind(2)
        h = ada_layer_norm(x, scale1, shift1, self.eps)
        x = x + as_dtype(self.sa(h, rope, mask, cache, layer), f32).mul(gamma1)
        norm = self.ca_norm
        h = F.layer_norm(x, x.shape[-1:], as_dtype(norm.weight, f32), as_dtype(norm.bias, f32), self.eps)
        x = x + as_dtype(self.ca(h, ca_kv, memory, backend), f32)
        h = ada_layer_norm(x, scale2, shift2, self.eps)
        return x + as_dtype(self.ffn(h), f32).mul(gamma2)


class PoolingAttention(BatchInvariantModule):
    """One learned query per head attends over a prompt's tokens: the pooled text vector."""

    def __init__(self, text_channels: int, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.mat_q = nn.Parameter(torch.empty(1, num_heads, self.head_dim))
        self.mat_kv = nn.Linear(text_channels, 2 * width, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)
        nn.init.trunc_normal_(self.mat_q, std=math.sqrt(1 / width / 3))

    def forward(self, text: TextMemory, backend: Backend) -> torch.Tensor:
        """text: normalised features (B, T, Ct) -> (B, C)"""
        B, T, _ = text.features.shape
        bias = torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        invariant = self.batch_invariant
        kv = linear(self.mat_kv, text.features, bias, batch_invariant=invariant)
        k, v = kv.view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, Hp, T, hdp)
        q = self.mat_q.to(k.dtype).unsqueeze(2).expand(B, -1, -1, -1)  # (B, Hp, 1, hdp)
        out = cross_attention(q, k, v, text, backend, batch_invariant=invariant)
        return linear(self.proj, out.reshape(B, -1), batch_invariant=invariant)


class TextAttentivePool(nn.Module):
    # Wrapper kept only so that parameter names match the checkpoint (`text_proj_for_sos.ca.*`).
    def __init__(self, text_channels: int, width: int, num_heads: int) -> None:
        super().__init__()
        self.ca = PoolingAttention(text_channels, width, num_heads)

    def forward(self, text: TextMemory, backend: Backend) -> torch.Tensor:
        return self.ca(text, backend)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def modulation(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, 1, 2, C) float32: slot 0 = scale, slot 1 = shift."""
        return self.ada_lin(pooled.float()).view(pooled.shape[0], 1, 2, -1)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        scale, shift = modulation.unbind(2)
        return ada_layer_norm(x, scale, shift, self.eps)
