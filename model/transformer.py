"""The Infinity transformer: text conditioning, block stack and bitwise head.

Parameter names equal the official checkpoint's, except that blocks are a flat `blocks.{i}`
list instead of `block_chunks.{i // k}.module.{i % k}` (see weights/keymap.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import Backend, TextMemory, block_causal_mask
from model.blocks import AdaLNBeforeHead, CrossAttnBlock, RMSNorm, TextAttentivePool, linear
from model.config import TransformerConfig
from model.invariance import BatchInvariantModule
from model.kv_cache import KVCache
from model.rope import rope_table
from model.schedules import ScaleSchedule


@dataclass(frozen=True)
class TextConditioning:
    """Everything the blocks need from the prompt, computed once per request (B rows)."""

    pooled: torch.Tensor  # (B, C) float32: start token content and AdaLN condition
    ada: torch.Tensor  # (B, 1, 6, C) float32: shared AdaLN modulation
    head_ada: torch.Tensor  # (B, 1, 2, C) float32: modulation before the head
    memory: TextMemory  # projected text (B, T, C) for cross-attention

    def select(self, positions: Sequence[int], index: torch.Tensor) -> TextConditioning:
        """The rows at `positions` (rows leaving a running batch); `index`: the same on the device."""
        memory = self.memory.select(positions, index)
        return TextConditioning(self.pooled[index], self.ada[index], self.head_ada[index], memory)

    @staticmethod
    def stack(parts: Sequence[TextConditioning]) -> TextConditioning:
        """The rows of each part in order, the text padded to the longest (two running batches merging)."""
        return _stack_conditionings(list(parts))


class Infinity(BatchInvariantModule):
    """Built with batch invariance off (training's one GEMM per layer); `set_batch_invariant(True)`
    switches it on for the whole model, as the pipeline does from RuntimeConfig.batch_invariant."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.cfg_uncond = nn.Parameter(torch.empty(c.text_maxlen, c.text_channels))
        self.pos_start = nn.Parameter(torch.empty(1, 1, c.width))
        self.text_norm = RMSNorm(c.text_channels, eps=c.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(c.text_channels, c.width, c.pool_heads)
        self.text_proj_for_ca = nn.Sequential(
            nn.Linear(c.text_channels, c.width), nn.GELU(approximate="tanh"), nn.Linear(c.width, c.width)
        )
        self.lvl_embed = nn.Embedding(c.num_levels, c.width)
        self.word_embed = nn.Linear(c.token_bits, c.width)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c.width, 6 * c.width))
        self.blocks = nn.ModuleList(
            CrossAttnBlock(c.width, c.num_heads, c.ffn_hidden, c.norm_eps) for _ in range(c.depth)
        )
        self.head_nm = AdaLNBeforeHead(c.width, c.norm_eps)
        self.head = nn.Linear(c.width, 2 * c.token_bits)
        self._init_free_parameters()

    @property
    def block_list(self) -> list[CrossAttnBlock]:
        """The blocks, typed: an nn.ModuleList hands out plain Modules."""
        return cast(list[CrossAttnBlock], list(self.blocks))

    @property
    def blocks_dtype(self) -> torch.dtype:
        """The blocks' compute dtype, also that of their K/V cache (the pipeline casts the blocks)."""
        return self.block_list[0].sa.mat_qkv.weight.dtype

    def _init_free_parameters(self) -> None:
        # Official inits; they matter only for training from scratch and for random test models.
        g = torch.Generator().manual_seed(0)
        if self.cfg_uncond.device.type != "meta":
            std = 1.2
            u = torch.empty_like(self.cfg_uncond, device="cpu")
            nn.init.trunc_normal_(u, std=std, generator=g)  # cut at absolute +-2, as the official init
            self.cfg_uncond.data.copy_(u / math.sqrt(self.config.text_channels))
        nn.init.trunc_normal_(self.pos_start, std=0.02)

    # ---- text -------------------------------------------------------------------------------
    def condition(self, text: TextMemory, backend: Backend = "sdpa") -> TextConditioning:
        """Raw T5 features (B, T, Ct) -> the conditioning of each row."""
        if self.batch_invariant and len(text.lengths) > 1:
            # Each row from its own prompt alone, unpadded: the GEMM shapes depend only on it.
            rows = [self.condition(_row(text, i), backend) for i in range(len(text.lengths))]
            return _stack_conditionings(rows)
        normed = self.text_norm(text.features)
        pooled = self.text_proj_for_sos(TextMemory(normed, text.lengths, text.sizes), backend).float()
        projected = self.text_proj_for_ca(normed.to(self.text_proj_for_ca[0].weight.dtype))
        ada = self.shared_ada_lin(pooled).view(pooled.shape[0], 1, 6, -1).float()
        memory = TextMemory(projected, text.lengths, text.sizes)
        return TextConditioning(pooled, ada, self.head_nm.modulation(pooled), memory)

    def unconditional_text(self, lengths: torch.Tensor) -> TextMemory:
        """The learned null prompt, cut to each prompt's own token count. lengths: (B,)"""
        T = int(lengths.max())
        feats = self.cfg_uncond[:T].float().unsqueeze(0).expand(len(lengths), -1, -1).clone()
        return TextMemory(feats, lengths)

    def cross_kv(self, cond: TextConditioning) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-block text K/V, computed once per request instead of once per scale."""
        memory = cond.memory
        if not self.batch_invariant or len(memory.sizes) == 1:
            return [block.ca.project_memory(memory.features) for block in self.block_list]
        T, rows = memory.features.shape[1], [_row(memory, i).features for i in range(len(memory.sizes))]
        out = []
        for block in self.block_list:  # each row's own tokens only, zero-padded back to T
            pairs = [block.ca.project_memory(r) for r in rows]
            out.append((_cat_padded([k for k, _ in pairs], T, dim=2), _cat_padded([v for _, v in pairs], T, dim=2)))
        return out

    # ---- tokens -----------------------------------------------------------------------------
    def start_tokens(self, cond: TextConditioning) -> torch.Tensor:
        """(B, 1, C): pooled text + learned start position."""
        return cond.pooled.unsqueeze(1) + self.pos_start.float()

    def embed_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """Next-scale inputs (B, l, token_bits) float32 -> (B, l, C) float32."""
        return linear(self.word_embed, codes, batch_invariant=self.batch_invariant).float()

    def add_level(self, x: torch.Tensor, scale_index: int) -> torch.Tensor:
        return x + self.lvl_embed.weight[scale_index].float()

    def logits(self, hidden: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """(B, l, C) -> (B, l, 2 * token_bits) float32; columns (2j, 2j+1) = logits of bit j = 0, 1."""
        h = self.head_nm(hidden, cond.head_ada)
        return linear(self.head, h, batch_invariant=self.batch_invariant).float()

    # ---- stack ------------------------------------------------------------------------------
    def run_blocks(
        self,
        x: torch.Tensor,
        cond: TextConditioning,
        ca_kv: list[tuple[torch.Tensor, torch.Tensor]],
        rope: torch.Tensor,
        backend: Backend,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, cond.ada, ca_kv[i], cond.memory, rope, backend, mask, cache, i)
        return x

    def step(
        self,
        x: torch.Tensor,
        scale_index: int,
        schedule: ScaleSchedule,
        cond: TextConditioning,
        ca_kv: list[tuple[torch.Tensor, torch.Tensor]],
        cache: KVCache,
        backend: Backend,
    ) -> torch.Tensor:
        """One scale with the KV cache: token embeddings (B, l, C) -> logits (B, l, 2 * token_bits)."""
        start, n = schedule.offsets[scale_index], schedule.lengths[scale_index]
        if cache.filled != start:
            raise RuntimeError(f"KV cache holds {cache.filled} tokens, scale {scale_index} starts at {start}")
        rope = rope_table(schedule, self.config.head_dim, x.device)[:, start : start + n]
        h = self.run_blocks(self.add_level(x, scale_index), cond, ca_kv, rope, backend, cache=cache)
        cache.advance(n)
        return self.logits(h, cond)

    def forward(
        self, cond: TextConditioning, schedule: ScaleSchedule, inputs: torch.Tensor, backend: Backend = "sdpa"
    ) -> list[torch.Tensor]:
        """Teacher forcing: all scales at once under the block-causal mask.

        inputs: (B, L_total - 1, token_bits) next-scale inputs of scales 1.. (scale 0 is the start
        token) -> per-scale logits, list of (B, h*w, 2 * token_bits).
        """
        expected = schedule.total_tokens - 1
        if inputs.shape[1] != expected:
            raise ValueError(f"inputs hold {inputs.shape[1]} tokens, schedule needs {expected}")
        x = torch.cat((self.start_tokens(cond), self.embed_bits(inputs)), dim=1)
        level = torch.repeat_interleave(
            torch.arange(schedule.num_scales, device=x.device), torch.tensor(schedule.lengths, device=x.device)
        )
        x = x + self.lvl_embed.weight.float()[level]
        mask = block_causal_mask(schedule.lengths, x.device)
        rope = rope_table(schedule, self.config.head_dim, x.device)
        h = self.run_blocks(x, cond, self.cross_kv(cond), rope, backend, mask=mask)
        return list(self.logits(h, cond).split(list(schedule.lengths), dim=1))


def _row(text: TextMemory, i: int) -> TextMemory:
    """Row i alone, cut to its own length."""
    n = text.sizes[i]
    return TextMemory(text.features[i : i + 1, :n], text.lengths[i : i + 1], (n,))


def cat_padded_kv(
    first: list[tuple[torch.Tensor, torch.Tensor]], second: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-block text K/V (B, H, T, hd) of two batches, rows of `first` then `second`, zero-padded to the
    longer text (cross-attention reads each row's own length only: the padding is never seen)."""
    out = []
    for (k1, v1), (k2, v2) in zip(first, second, strict=True):
        T = max(k1.shape[2], k2.shape[2])
        out.append((_cat_padded([k1, k2], T, dim=2), _cat_padded([v1, v2], T, dim=2)))
    return out


def _cat_padded(tensors: list[torch.Tensor], length: int, dim: int) -> torch.Tensor:
    """Concatenate along the batch axis, each zero-padded to `length` along `dim`."""

    def pad(t: torch.Tensor) -> torch.Tensor:
        widths = [0, 0] * (t.dim() - 1 - dim) + [0, length - t.shape[dim]]
        return F.pad(t, widths)

    return torch.cat([pad(t) for t in tensors])


def _stack_conditionings(rows: list[TextConditioning]) -> TextConditioning:
    T = max(r.memory.features.shape[1] for r in rows)
    features = _cat_padded([r.memory.features for r in rows], T, dim=1)
    return TextConditioning(
        torch.cat([r.pooled for r in rows]),
        torch.cat([r.ada for r in rows]),
        torch.cat([r.head_ada for r in rows]),
        TextMemory(
            features, torch.cat([r.memory.lengths for r in rows]), tuple(n for r in rows for n in r.memory.sizes)
        ),
    )
