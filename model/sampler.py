"""The scale-by-scale autoregressive loop: next-scale prediction with a bitwise classifier.

Per scale: embed the accumulated codes, run the blocks with the KV cache, mix conditional and
unconditional logits (classifier-free guidance), sample every bit, add the new codes to the
latent. Each batch row has its own sampling parameters and its own torch.Generator, so a seed
gives the same bits whatever else shares the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch

from model.attention import Backend, TextMemory, stack_memories
from model.config import SamplingParams
from model.kv_cache import KVCache
from model.quantizer import BitwiseQuantizer
from model.schedules import ScaleSchedule
from model.transformer import Infinity, TextConditioning


@dataclass(frozen=True)
class ScaleEvent:
    """Reported after each scale (progress bars, streamed previews, cancellation checks)."""

    scale_index: int
    num_scales: int
    rows: tuple[int, ...]  # original row index of each row still running
    latent: torch.Tensor  # (len(rows), d, H, W): codes accumulated so far
    seconds: float


# Returns the original indices of rows to drop before the next scale (None: keep them all).
ScaleCallback = Callable[[ScaleEvent], Collection[int] | None]


@dataclass(frozen=True)
class SampleOutput:
    rows: tuple[int, ...]  # original row index of each returned row (dropped rows are absent)
    nonfinite: tuple[int, ...]  # those of `rows` whose logits went non-finite: their bits are noise
    bits: list[torch.Tensor]  # per scale (len(rows), h, w, d) uint8, latent layout
    latent: torch.Tensor  # (len(rows), d, H, W) float32, input of the VAE decoder
    scale_seconds: list[float]


@dataclass
class _RunningRows:
    """Per-row state of a running batch, so that rows can leave between scales."""

    ids: list[int]
    params: list[SamplingParams]
    generators: list[torch.Generator]
    cond: TextConditioning
    ca_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cache: KVCache
    guided: bool
    nonfinite: torch.Tensor  # (rows,) bool: a logit of this row was inf or NaN at some scale

    def drop(self, ids: Collection[int]) -> list[int]:
        """Remove rows by original id; returns the positions kept (for tensors held by the caller)."""
        keep = [i for i, rid in enumerate(self.ids) if rid not in ids]
        index = torch.tensor(keep, dtype=torch.long, device=self.cache.keys.device)
        both = torch.cat((index, index + len(self.ids))) if self.guided else index
        self.ids = [self.ids[i] for i in keep]
        self.params = [self.params[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.cond = self.cond.select(both)
        self.ca_kv = [(k[both], v[both]) for k, v in self.ca_kv]
        self.cache = self.cache.select(both)
        self.nonfinite = self.nonfinite[index]
        return keep

    def stop_guidance(self) -> None:
        """Every row's cfg is 1 on every remaining scale: keep only the conditional rows (half the
        transformer work and KV cache from here on). With cfg 1 the unconditional logits enter with
        weight 0, so the bits do not change (batch invariance keeps the conditional rows' numbers)."""
        index = torch.arange(len(self.ids), device=self.cache.keys.device)
        self.cond = self.cond.select(index)
        self.ca_kv = [(k[index], v[index]) for k, v in self.ca_kv]
        self.cache = self.cache.select(index)
        self.guided = False


def guide(logits: torch.Tensor, params: list[SamplingParams], scale_index: int, guided: bool) -> torch.Tensor:
    """Temperature then CFG on logits: cfg * l_cond + (1 - cfg) * l_uncond, per row.

    logits: (2B or B, l, V) with conditional rows first -> (B, l, V)
    """
    B = len(params)
    # Python-float arithmetic first, then float32: the same constants as the official scalars.
    inv_tau = logits.new_tensor([1 / p.tau_at(scale_index) for p in params]).view(B, 1, 1)
    if not guided:
        return logits * inv_tau
    w_cond = logits.new_tensor([p.cfg_at(scale_index) for p in params]).view(B, 1, 1)
    w_uncond = logits.new_tensor([1 - p.cfg_at(scale_index) for p in params]).view(B, 1, 1)
    return w_cond * (logits[:B] * inv_tau) + w_uncond * (logits[B:] * inv_tau)


def quarantine_nonfinite(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, l, V) guided logits -> (logits with every non-finite row zeroed, (B,) bool: which rows).

    Extreme sampling values (a tiny tau, a huge cfg) can overflow a row's logits; sampling such a
    row would raise and fail every row of the batch. Zeroed, the row samples noise (its result is
    discarded by the caller) and its batch-mates are untouched. Flags stay on the device: no sync.
    """
    bad = ~torch.isfinite(logits).flatten(1).all(dim=1)
    return logits.masked_fill(bad.view(-1, 1, 1), 0.0), bad


def filter_bit_logits(pairs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k / top-p on 2-way bit logits (N, 2); removed values become -inf.

    With two classes top-k >= 2 keeps both, and top-p removes the minority value when its
    probability is <= 1 - top_p (official default 0.97: <= 0.03).
    """
    pairs = pairs.clone()
    if top_k == 1:
        pairs.masked_fill_(pairs < pairs.amax(dim=-1, keepdim=True), float("-inf"))
    if top_p > 0:
        probs = pairs.softmax(dim=-1)
        minority = pairs.argmin(dim=-1, keepdim=True)
        p_min = probs.gather(-1, minority)
        threshold = torch.tensor(1 - top_p, dtype=probs.dtype, device=probs.device)
        drop = torch.zeros_like(pairs, dtype=torch.bool).scatter_(-1, minority, p_min <= threshold)
        pairs.masked_fill_(drop, float("-inf"))
    return pairs


def sample_bits(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, l, 2D) guided logits -> bits (B, l, D) int64, each row with its own generator."""
    B, l, V = logits.shape
    pairs = logits.view(B, l * V // 2, 2)
    rows = []
    for b, p in enumerate(params):
        if p.top_k == 1:
            # Greedy must not depend on the seed: argmax, an exact tie resolves to bit 0.
            rows.append((pairs[b, :, 1] > pairs[b, :, 0]).long())
            continue
        probs = filter_bit_logits(pairs[b], p.top_k, p.top_p).softmax(dim=-1)
        rows.append(torch.multinomial(probs, 1, replacement=True, generator=generators[b])[:, 0])
    return torch.stack(rows).view(B, l, V // 2)


def sample(
    model: Infinity,
    quantizer: BitwiseQuantizer,
    schedule: ScaleSchedule,
    text: TextMemory,
    uncond_text: TextMemory,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    backend: Backend,
    on_scale: ScaleCallback | None = None,
) -> SampleOutput:
    """Generate the bits of every scale for B prompts.

    text / uncond_text: raw T5 features of the prompts and of their unconditional counterparts
    (learned null prompt or negative prompt), B rows each. `params` hold a value per scale wherever they
    give a list: the caller checked them (`InfinityPipeline.generate`).
    """
    B, n = len(params), schedule.num_scales
    guided = any(p.uses_guidance(n) for p in params)
    cond = model.condition(stack_memories(text, uncond_text) if guided else text, backend)
    c = model.config
    cache = KVCache.allocate(
        c.depth,
        2 * B if guided else B,
        c.num_heads,
        schedule.total_tokens,
        c.head_dim,
        model.blocks_dtype,
        text.features.device,
    )
    state = _RunningRows(
        list(range(B)),
        list(params),
        list(generators),
        cond,
        model.cross_kv(cond),
        cache,
        guided,
        torch.zeros(B, dtype=torch.bool, device=text.features.device),
    )
    vae_scales = schedule.vae_scales(quantizer.config.spatial_patchify)

    x = model.start_tokens(cond)  # (rows, 1, C)
    latent, bits_out, seconds = None, [], []
    for si, (h, w) in enumerate(schedule.scales):
        t0 = time.perf_counter()
        raw = model.step(x, si, schedule, state.cond, state.ca_kv, state.cache, backend)
        logits, bad = quarantine_nonfinite(guide(raw, state.params, si, state.guided))
        state.nonfinite |= bad
        token_bits = sample_bits(logits, state.params, state.generators).view(len(state.ids), h, w, -1)
        bits = quantizer.to_latent_layout(token_bits)  # (B, h', w', d)
        latent = quantizer.accumulate(latent, quantizer.codes(bits, si), vae_scales[-1])
        bits_out.append(bits.to(torch.uint8))
        seconds.append(time.perf_counter() - t0)
        dropped = on_scale(ScaleEvent(si, n, tuple(state.ids), latent, seconds[-1])) if on_scale else None
        if dropped:
            keep = state.drop(set(dropped))
            latent, bits_out = latent[keep], [b[keep] for b in bits_out]
            if not state.ids:
                break
        if si + 1 < n:
            if state.guided and not any(p.uses_guidance(n, start=si + 1) for p in state.params):
                state.stop_guidance()  # cfg 1 from here on, for every row
            x = model.embed_bits(quantizer.next_inputs(latent, vae_scales[si + 1]))
            x = torch.cat((x, x)) if state.guided else x
    assert latent is not None  # a schedule has at least one scale
    nonfinite = tuple(rid for rid, bad in zip(state.ids, state.nonfinite.tolist(), strict=True) if bad)
    return SampleOutput(tuple(state.ids), nonfinite, bits_out, latent, seconds)
