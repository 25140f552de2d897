"""Batch invariance: one process-wide switch (RuntimeConfig.batch_invariant, on by default).

A GEMM library picks its kernel, and so its summation order, from the matrix shapes: folded into
one (B*L, K) matrix, a row's result depends on how many rows share the call (measured on this CPU:
up to ~2e-5 in fp32 for M < 64..200), which flips near-tie bits, so a seed's image would depend on
its batch. With the switch on, each batch row gets GEMMs of its own shape (`model.blocks.linear`),
its own conditioning, and cross-attention over exactly its own text (`model.attention`). Training
turns it off: it wants one big GEMM and one attention call per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

_BATCH_INVARIANT = True


def set_batch_invariant(enabled: bool) -> None:
    global _BATCH_INVARIANT
    _BATCH_INVARIANT = enabled


def batch_invariant() -> bool:
    return _BATCH_INVARIANT


@contextmanager
def batch_invariance(enabled: bool) -> Iterator[None]:
    """The switch for a block of code."""
    previous = _BATCH_INVARIANT
    set_batch_invariant(enabled)
    try:
        yield
    finally:
        set_batch_invariant(previous)
