"""Attention kernels: flash-attn (varlen, CUDA, when installed) or torch SDPA.

The backend is chosen once per pipeline and logged with the reason; nothing here silently
swallows an ImportError.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from model.config import AttentionChoice

log = logging.getLogger(__name__)

# What each backend computes, and what it does and does not match: model.config.ATTENTION_MODES.
# "sdpa": exact attention in q's dtype (float32 inside on CPU). "flash": flash-attn varlen kernels
# (CUDA, half precision). "sdpa-bf16io": SDPA with flash-attn's rounding, bf16 q/k/v in and output out.
Backend = Literal["sdpa", "flash", "sdpa-bf16io"]


@dataclass(frozen=True)
class TextMemory:
    """Variable-length text features, padded to the longest row.

    features: (B, T, C); lengths: (B,) int64 on the same device; key_mask: (B, 1, 1, T) bool, True = valid.
    """

    features: torch.Tensor
    lengths: torch.Tensor

    @property
    def key_mask(self) -> torch.Tensor:
        T = self.features.shape[1]
        valid = torch.arange(T, device=self.lengths.device)[None, :] < self.lengths[:, None]
        return valid[:, None, None, :]

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return F.pad(self.lengths.cumsum(0, dtype=torch.int32), (1, 0))

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) padded -> (sum(lengths), ...) packed, in row order."""
        valid = self.key_mask[:, 0, 0, :]
        return x[valid]


def choose_backend(requested: AttentionChoice, device: torch.device) -> Backend:
    """Pick the cross-attention kernel and log why (the pipeline logs what its numbers match)."""
    backend, why = _resolve(requested, device, importlib.util.find_spec("flash_attn") is not None)
    log.info("attention backend: %s (%s)", backend, why)
    return backend


def _resolve(requested: AttentionChoice, device: torch.device, has_flash: bool) -> tuple[Backend, str]:
    if requested in ("sdpa", "sdpa-bf16io"):
        return requested, "requested"
    if requested == "flash":
        if device.type != "cuda" or not has_flash:
            raise ValueError(
                f"attention='flash' needs CUDA and the flash-attn package "
                f"(device={device}, flash_attn installed={has_flash})"
            )
        return "flash", "requested"
    if device.type != "cuda":
        # Exact: a float32 run on CPU gets float32 attention, as a user expects.
        return "sdpa", f"auto on {device.type}; flash-attn is CUDA-only"
    if not has_flash:
        # flash-attn's rounding without flash-attn: numbers close to a CUDA machine that has it.
        return "sdpa-bf16io", "auto on CUDA, flash-attn not installed (`pip install .[gpu]`)"
    return "flash", "auto on CUDA, flash-attn installed"


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: TextMemory, backend: Backend, *, batch_invariant: bool
) -> torch.Tensor:
    """Each row's queries attend to its own text tokens only; batch-invariant, each row's result is a
    function of its own text alone (see model/invariance.py).

    q: (B, H, Lq, hd); k, v: (B, H, T, hd) padded like `memory` -> (B, H, Lq, hd)
    """
    if backend == "flash":
        return _flash_varlen(q, k, v, memory)
    attend = _sdpa_bf16io if backend == "sdpa-bf16io" else sdpa
    if not batch_invariant:
        return _masked(attend, q, k, v, memory)
    return _by_length(attend, q, k, v, memory)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention in q's dtype. On CPU, half-precision inputs are computed in float32
    (autocast off) and the result cast back: torch's CPU bf16 attention kernels are ~2x (self-attention,
    130 tokens) to ~5x (cross-attention, 12 text tokens) slower than the float32 ones at this model's
    sizes (forward + backward, measured on the 2-core CPU), and float32 accumulation is what flash-attn
    does on the GPU anyway."""
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    with torch.autocast(q.device.type, enabled=False):
        out = F.scaled_dot_product_attention(
            q.to(compute), k.to(compute), v.to(compute), attn_mask=attn_mask, scale=scale
        )
    return out.to(q.dtype)


def _sdpa_bf16io(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA with flash-attn's numerics: inputs and output rounded to bf16, fp32 inside."""
    q_r, k_r, v_r = (t.to(torch.bfloat16).float() for t in (q, k, v))
    return sdpa(q_r, k_r, v_r, attn_mask=attn_mask).to(torch.bfloat16).to(q.dtype)


def _masked(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: TextMemory) -> torch.Tensor:
    """One call over the padded keys, padding masked out (batch invariance off: training's path,
    ~10% faster per step than one call per text length)."""
    T = k.shape[2]
    visible = torch.arange(T, device=k.device)[None, :] < memory.lengths.to(k.device)[:, None]
    return attend(q, k, v, attn_mask=visible[:, None, None, :])


def _by_length(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: TextMemory) -> torch.Tensor:
    """Rows grouped by text length, each group over exactly its own keys (no padding, no mask).

    A padded, masked key axis changes how the kernel splits its sums, so a row's result would
    depend on the longest prompt it shares a batch with: that flipped near-tie bits. Grouping makes
    a row's attention a function of its own text only (batch invariance), as varlen flash-attn is.
    """
    lengths = memory.lengths.tolist()
    if len(set(lengths)) == 1:
        return attend(q, k[:, :, : lengths[0]], v[:, :, : lengths[0]])
    out = torch.empty_like(q)
    for length in sorted(set(lengths)):
        rows = torch.tensor([i for i, n in enumerate(lengths) if n == length], device=q.device)
        out[rows] = attend(q[rows], k[rows, :, :length], v[rows, :, :length])
    return out


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: TextMemory) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_kvpacked_func

    B, H, Lq, hd = q.shape
    dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q_packed = q.transpose(1, 2).reshape(B * Lq, H, hd).to(dtype)
    kv = torch.stack((k, v), dim=2).permute(0, 3, 2, 1, 4)  # (B, T, 2, H, hd)
    kv_packed = memory.compact(kv).to(dtype)
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_kvpacked_func(
        q_packed,
        kv_packed,
        cu_q,
        memory.cu_seqlens,
        Lq,
        int(memory.lengths.max()),
        dropout_p=0.0,
        softmax_scale=hd**-0.5,
    )
    return out.reshape(B, Lq, H, hd).transpose(1, 2).to(q.dtype)


def block_causal_mask(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Token of scale a sees token of scale b iff b <= a. (L, L) bool, True = visible."""
    level = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])
    return level[:, None] >= level[None, :]


def stack_memories(first: TextMemory, second: TextMemory) -> TextMemory:
    """Rows of `first` then rows of `second`, padded to the longer of the two."""
    T = max(first.features.shape[1], second.features.shape[1])

    def pad(m: TextMemory) -> torch.Tensor:
        return F.pad(m.features, (0, 0, 0, T - m.features.shape[1]))

    return TextMemory(torch.cat((pad(first), pad(second))), torch.cat((first.lengths, second.lengths)))
