"""A self-attention KV cache preallocated for a whole scale schedule.

Written in place scale by scale; never grown by concatenation, so its memory is known before a
batch starts (the server's admission uses `bytes_per_row`). A new generation is a new cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: torch.Tensor  # (depth, B, H, L_total, hd)
    values: torch.Tensor  # (depth, B, H, L_total, hd)
    filled: int = 0  # tokens written by completed scales

    @classmethod
    def allocate(
        cls,
        depth: int,
        batch: int,
        heads: int,
        total_tokens: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (depth, batch, heads, total_tokens, head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @staticmethod
    def bytes_per_row(depth: int, heads: int, total_tokens: int, head_dim: int, dtype: torch.dtype) -> int:
        """Cache bytes for one batch row (a guided image needs two rows)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * depth * heads * total_tokens * head_dim * itemsize

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this scale's k, v (B, H, l, hd) at the current offset; return the visible prefix."""
        end = self.filled + k.shape[2]
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]  # the visible prefix
        keys[:, :, self.filled :].copy_(k)  # one view per tensor, written through: fewer ops than a
        values[:, :, self.filled :].copy_(v)  # setitem and a second index
        return keys, values

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache holding only batch rows `rows` (rows leaving a running batch)."""
        return KVCache(self.keys[:, rows], self.values[:, rows], self.filled)

    @classmethod
    def merge(cls, first: KVCache, second: KVCache, rows: torch.Tensor) -> KVCache:
        """One cache for the rows of `first` then `second`, put in the order `rows` indexes (two running
        batches at the same scale merging). Allocated for the whole schedule, as each was; only the
        filled prefix is copied."""
        assert first.filled == second.filled and first.keys.shape[3] == second.keys.shape[3]
        filled = first.filled

        def merged(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            out = a.new_empty((a.shape[0], len(rows), *a.shape[2:]))
            out[:, :, :, :filled] = torch.cat((a[:, :, :, :filled], b[:, :, :, :filled]), 1)[:, rows]
            return out

        return cls(merged(first.keys, second.keys), merged(first.values, second.values), filled)

    def advance(self, tokens: int) -> None:
        """Mark a scale as complete (called once per scale, after every layer wrote it)."""
        self.filled += tokens
        if self.filled > self.keys.shape[3]:
            raise RuntimeError(f"KV cache overflow: {self.filled} > {self.keys.shape[3]} tokens")
