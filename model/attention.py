"""Attention kernels: flash-attn (varlen, CUDA, when installed) or torch SDPA.

The backend is chosen once per pipeline and logged with the reason; nothing here silently
swallows an ImportError.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
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

    features: (B, T, C); lengths: (B,) int64 on the same device; sizes: the same lengths as Python ints.
    `sizes` is read from `lengths` once, when the memory is made (a request's setup), unless the maker
    passes it: the scale loop then groups rows, cuts keys and builds masks without reading anything back
    from the device. Masks and indices are built once per memory, on first use (scale 0).
    """

    features: torch.Tensor
    lengths: torch.Tensor
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.lengths):
            object.__setattr__(self, "sizes", tuple(int(n) for n in self.lengths.tolist()))

    def select(self, positions: Sequence[int], index: torch.Tensor) -> TextMemory:
        """The rows at `positions`; `index` holds the same positions on the device (no sync here)."""
        sizes = tuple(self.sizes[i] for i in positions)
        picked = TextMemory(self.features[index], self.lengths[index], sizes)
        if list(positions) == list(range(len(sizes))) and "groups" in self.__dict__:
            # The first rows (guidance stopped): a group's rows are sorted, so the first rows of each group
            # are a prefix of its index, a view: no new index to copy to the device.
            prefixes = tuple((n, rows[: sizes.count(n)]) for n, rows in self.groups if n in sizes)
            picked.__dict__["groups"] = prefixes  # the cached_property's own slot
        return picked

    @cached_property
    def key_mask(self) -> torch.Tensor:
        """(B, 1, 1, T) bool, True = a valid key."""
        T = self.features.shape[1]
        valid = torch.arange(T, device=self.lengths.device)[None, :] < self.lengths[:, None]
        return valid[:, None, None, :]

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """(B + 1,) int32 offsets of each row in the packed keys."""
        return F.pad(self.lengths.cumsum(0, dtype=torch.int32), (1, 0))

    @cached_property
    def groups(self) -> tuple[tuple[int, torch.Tensor], ...]:
        """(length, (rows,) int64 device index) per distinct text length, shortest first."""
        by_length: dict[int, list[int]] = {}
        for row, n in enumerate(self.sizes):
            by_length.setdefault(n, []).append(row)
        device = self.lengths.device
        return tuple((n, device_index(rows, device)) for n, rows in sorted(by_length.items()))

    @cached_property
    def packed_index(self) -> torch.Tensor:
        """(sum(sizes),) int64: position of each valid token in the (B * T) flattened padding."""
        T = self.features.shape[1]
        return device_index([b * T + t for b, n in enumerate(self.sizes) for t in range(n)], self.lengths.device)

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) padded -> (sum(lengths), ...) packed, in row order (an index, not a boolean mask:
        no device-to-host read of the output size)."""
        return x.flatten(0, 1).index_select(0, self.packed_index)


def device_index(positions: Sequence[int], device: torch.device) -> torch.Tensor:
    """Positions as an int64 index on `device`. On CUDA staged in pinned memory and copied without
    blocking: a copy from pageable memory would wait for every kernel queued before it."""
    host = torch.tensor(positions, dtype=torch.long)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


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


@torch.compiler.disable
def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: TextMemory, backend: Backend, *, batch_invariant: bool
) -> torch.Tensor:
    """Each row's queries attend to its own text tokens only; batch-invariant, each row's result is a
    function of its own text alone (see model/invariance.py).

    Left out of torch.compile: the row groups are Python values of the request (`memory.sizes`), which a
    compiled block would guard on and recompile for at every new set of prompt lengths.

    q: (B, H, Lq, hd); k, v: (B, H, T, hd) padded like `memory` -> (B, H, Lq, hd)
    """
    if backend == "flash":
        return _flash_varlen(q, k, v, memory)
    attend = _sdpa_bf16io if backend == "sdpa-bf16io" else sdpa
    if not batch_invariant:
        return attend(q, k, v, attn_mask=memory.key_mask)  # training's path, ~10% faster than by length
    return _by_length(attend, q, k, v, memory)


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float | None = None
) -> torch.Tensor:
    """Scaled dot-product attention in q's dtype. On CPU, half-precision inputs are computed in float32
    (autocast off) and the result cast back: torch's CPU bf16 attention kernels are ~2x (self-attention,
    130 tokens) to ~5x (cross-attention, 12 text tokens) slower than the float32 ones at this model's
    sizes (forward + backward, measured on the 2-core CPU), and float32 accumulation is what flash-attn
    does on the GPU anyway."""
    if torch.is_autocast_enabled(q.device.type):
        with torch.autocast(q.device.type, enabled=False):
            return sdpa(q, k, v, attn_mask, scale)
    compute = torch.float32 if q.device.type == "cpu" else q.dtype
    out = F.scaled_dot_product_attention(
        as_dtype(q, compute), as_dtype(k, compute), as_dtype(v, compute), attn_mask=attn_mask, scale=scale
    )
    return as_dtype(out, q.dtype)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)` without dispatching an op when x already has it (the same tensor either way)."""
    return x if x.dtype == dtype else x.to(dtype)


def _sdpa_bf16io(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA with flash-attn's numerics: inputs and output rounded to bf16, fp32 inside."""
    q_r, k_r, v_r = (t.to(torch.bfloat16).float() for t in (q, k, v))
    return sdpa(q_r, k_r, v_r, attn_mask=attn_mask).to(torch.bfloat16).to(q.dtype)


Attend = Callable[..., torch.Tensor]


def _by_length(attend: Attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory: TextMemory) -> torch.Tensor:
    """Rows grouped by text length, each group over exactly its own keys (no padding, no mask).

    A padded, masked key axis changes how the kernel splits its sums, so a row's result would
    depend on the longest prompt it shares a batch with: that flipped near-tie bits. Grouping makes
    a row's attention a function of its own text only (batch invariance), as varlen flash-attn is.
    The groups and their device indices are the memory's own, built once per request.
    """
    groups = memory.groups
    if len(groups) == 1:
        n = groups[0][0]
        return attend(q, k[:, :, :n], v[:, :, :n])
    out = torch.empty_like(q)
    for n, rows in groups:
        out[rows] = attend(q[rows], k[rows, :, :n], v[rows, :, :n])
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
        max(memory.sizes),
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

    lengths = torch.cat((first.lengths, second.lengths))
    return TextMemory(torch.cat((pad(first), pad(second))), lengths, first.sizes + second.sizes)
