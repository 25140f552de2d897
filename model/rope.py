"""RoPE-2D as Infinity uses it (`rope2d_normalized_by_hw=2`).

Each token of a (h, w) scale gets integer grid positions on the template's final 1M grid:
row_pos(i) = round(float32(i) * float32(H_final / h)) with round-half-to-even, likewise columns.
Pairs (2p, 2p+1) of a head vector rotate; the first head_dim/4 pairs by the row position, the
rest by the column position, with frequencies 10000^(-4k/head_dim).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from model.schedules import ScaleSchedule


def grid_positions(size: int, reference: int) -> torch.Tensor:
    """Integer positions of `size` evenly spread cells on a `reference`-long axis. (size,) int64"""
    # float32 product then round-half-to-even: this is what makes 4.5 -> 4 and 13.5 -> 14.
    step = torch.tensor(reference / size, dtype=torch.float32)
    return (torch.arange(size, dtype=torch.float32) * step).round().long()


def scale_positions(schedule: ScaleSchedule) -> torch.Tensor:
    """(row, col) position of every token of the schedule, in sequence order. (L, 2) int64"""
    ref_h, ref_w = schedule.rope_reference
    parts = []
    for h, w in schedule.scales:
        rows = grid_positions(h, ref_h)[:, None].expand(h, w)
        cols = grid_positions(w, ref_w)[None, :].expand(h, w)
        parts.append(torch.stack((rows, cols), dim=-1).reshape(h * w, 2))
    return torch.cat(parts)


def inverse_frequencies(head_dim: int) -> torch.Tensor:
    """(head_dim // 4,) float32, computed with the same float32 ops as the official table."""
    half = head_dim // 2
    return 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64) / half))


@lru_cache(maxsize=64)
def _rope_table_cpu(schedule: ScaleSchedule, head_dim: int) -> torch.Tensor:
    pos = scale_positions(schedule).float()  # (L, 2)
    inv = inverse_frequencies(head_dim)  # (hd/4,)
    angles = torch.cat((torch.outer(pos[:, 0], inv), torch.outer(pos[:, 1], inv)), dim=-1)  # (L, hd/2)
    return torch.stack((angles.cos(), angles.sin()))  # (2, L, hd/2)


_DEVICE_TABLES: dict[tuple[ScaleSchedule, int, str], torch.Tensor] = {}


def rope_table(schedule: ScaleSchedule, head_dim: int, device: torch.device | str) -> torch.Tensor:
    """cos/sin table for every token of the schedule. (2, L, head_dim // 2) float32 on `device`."""
    key = (schedule, head_dim, str(device))
    table = _DEVICE_TABLES.get(key)
    if table is None:
        table = _rope_table_cpu(schedule, head_dim).to(device)
        _DEVICE_TABLES[key] = table
    return table


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs. x: (B, H, L, hd); table: (2, L, hd/2) -> (B, H, L, hd) in x.dtype."""
    cos, sin = table[0].to(x.dtype), table[1].to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))  # (B, H, L, hd/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((cos * a - sin * b, sin * a + cos * b), dim=-1).flatten(-2)
