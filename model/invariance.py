"""Batch invariance: a seed's image must not depend on what else shares its batch.

A GEMM library picks its kernel, and so its summation order, from the matrix shapes: folded into
one (B*L, K) matrix, a row's result depends on how many rows share the call (measured on this CPU:
up to ~2e-5 in fp32 for M < 64..200), which flips near-tie bits, so a seed's image would depend on
its batch. Batch-invariant, each batch row gets GEMMs of its own shape (`per_row_linear`), its own
conditioning (`Infinity.condition`), and cross-attention over exactly its own text
(`model.attention.cross_attention`).

The switch belongs to a model, not to the process: `set_batch_invariant` sets it on a model and its
submodules, as `train()` sets `training`, so two pipelines in one process keep their own. A freshly
built model is off, because training wants one big GEMM and one attention call per layer; a pipeline
sets its model from `RuntimeConfig.batch_invariant` (on by default).
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

_M = TypeVar("_M", bound="BatchInvariantModule")


class BatchInvariantModule(nn.Module):
    """A module whose GEMMs and attention can run batch row by batch row (`batch_invariant`)."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_invariant = False  # off when built: one GEMM per layer, as training wants

    def set_batch_invariant(self: _M, enabled: bool) -> _M:
        """Switch this module and each of its submodules that has the switch."""
        for module in self.modules():
            if isinstance(module, BatchInvariantModule):
                module.batch_invariant = enabled
        return self


def per_row_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x (B, ..., K): each of the B rows multiplied in a GEMM of its own shape (..., K) x (K, N)."""
    B = x.shape[0]
    rows = x.reshape(B, -1, x.shape[-1])
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        out = torch.stack([F.linear(r, w) for r in rows])  # CPU bf16 bmm has no fast kernel
    else:
        # A batched GEMM runs one kernel per matrix; a batch of one is routed to the plain GEMM
        # (another kernel), so a lone row is paired with a copy of itself.
        paired = rows if B > 1 else rows.expand(2, -1, -1)
        out = torch.bmm(paired, w.t().expand(paired.shape[0], -1, -1))[:B]
    if b is not None:
        out = out + b
    return out.reshape(*x.shape[:-1], w.shape[0])
