"""The scale-by-scale autoregressive loop: next-scale prediction with a bitwise classifier.

Per scale: embed the accumulated codes, run the blocks with the KV cache, mix conditional and
unconditional logits (classifier-free guidance), sample every bit, add the new codes to the
latent. Each batch row has its own sampling parameters and its own torch.Generator, so a seed
gives the same bits whatever else shares the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from model.attention import Backend, TextMemory, device_index, stack_memories
from model.config import SamplingParams
from model.image_condition import ForcedBits
from model.kv_cache import KVCache
from model.quantizer import BitwiseQuantizer
from model.schedules import ScaleSchedule
from model.transformer import Infinity, TextConditioning, cat_padded_kv


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

SCALE_RANGE = "sampler scale"  # profiler range of each scale: "sampler scale 0", "sampler scale 1", ...


@dataclass(frozen=True)
class SampleOutput:
    rows: tuple[int, ...]  # original row index of each returned row (dropped rows are absent)
    nonfinite: tuple[int, ...]  # those of `rows` whose logits went non-finite: their bits are noise
    bits: list[torch.Tensor]  # per scale (len(rows), h, w, d) uint8, latent layout
    latent: torch.Tensor  # (len(rows), d, H, W) float32, input of the VAE decoder
    scale_seconds: list[float]


@dataclass(frozen=True)
class RowParams:
    """Each row's sampling parameters as device tensors, built once per request: the scale loop picks
    a scale's column on the device instead of copying Python floats to it at every scale.

    Tables are (num_scales, B, 1, 1), so a scale's values are one contiguous (B, 1, 1) view.
    """

    inv_tau: torch.Tensor  # 1 / tau, float32 of the Python quotient (the official constant)
    w_cond: torch.Tensor  # cfg
    w_uncond: torch.Tensor  # 1 - cfg, computed in Python as the official scalar is
    top_p_limit: torch.Tensor  # (B, 1, 1): 1 - top_p; -1 where top-p is off (no probability is <= -1)
    greedy: tuple[bool, ...]  # top_k == 1: the bit is the argmax, no draw
    greedy_mask: torch.Tensor  # (B, 1) bool, the same on the device

    @classmethod
    def build(
        cls, params: Sequence[SamplingParams], num_scales: int, dtype: torch.dtype, device: torch.device
    ) -> RowParams:
        def table(value: Callable[[SamplingParams, int], float]) -> torch.Tensor:
            rows = [[value(p, k) for p in params] for k in range(num_scales)]
            return torch.tensor(rows, dtype=dtype, device=device).view(num_scales, len(params), 1, 1)

        limits = [1 - p.top_p if p.top_p > 0 else -1.0 for p in params]
        greedy = tuple(p.top_k == 1 for p in params)
        return cls(
            table(lambda p, k: 1 / p.tau_at(k)),
            table(lambda p, k: p.cfg_at(k)),
            table(lambda p, k: 1 - p.cfg_at(k)),
            torch.tensor(limits, dtype=dtype, device=device).view(-1, 1, 1),
            greedy,
            torch.tensor(greedy, device=device).view(-1, 1),
        )

    def cat(self, other: RowParams) -> RowParams:
        """This batch's rows, then `other`'s (two running batches merging)."""
        return RowParams(
            torch.cat((self.inv_tau, other.inv_tau), 1),
            torch.cat((self.w_cond, other.w_cond), 1),
            torch.cat((self.w_uncond, other.w_uncond), 1),
            torch.cat((self.top_p_limit, other.top_p_limit)),
            self.greedy + other.greedy,
            torch.cat((self.greedy_mask, other.greedy_mask)),
        )

    def select(self, positions: Sequence[int], index: torch.Tensor) -> RowParams:
        """The rows at `positions` (`index`: the same positions on the device)."""
        return RowParams(
            self.inv_tau[:, index],
            self.w_cond[:, index],
            self.w_uncond[:, index],
            self.top_p_limit[index],
            tuple(self.greedy[i] for i in positions),
            self.greedy_mask[index],
        )


@dataclass(frozen=True)
class Forcing:
    """Bits forced to given values (image-to-image, model/image_condition.py), for a whole batch.

    Per scale, in latent layout: `where` (B, h, w, 1) bool, True = forced; `bits` (B, h, w, d) int64.
    Rows without an image are never forced. Built once per request; applying it reads nothing back.
    """

    where: list[torch.Tensor]
    bits: list[torch.Tensor]

    @classmethod
    def build(
        cls, rows: Sequence[ForcedBits | None], vae_scales: tuple[tuple[int, int], ...], bits: int, device: torch.device
    ) -> Forcing | None:
        if all(r is None for r in rows):
            return None
        where, values = [], []
        for k, (h, w) in enumerate(vae_scales):
            where.append(torch.zeros(len(rows), h, w, 1, dtype=torch.bool, device=device))
            values.append(torch.zeros(len(rows), h, w, bits, dtype=torch.long, device=device))
            for b, r in enumerate(rows):
                if r is not None:
                    where[k][b, ..., 0] = r.where[k]
                    values[k][b] = r.bits[k]
        return cls(where, values)

    def select(self, index: torch.Tensor) -> Forcing:
        return Forcing([w[index] for w in self.where], [b[index] for b in self.bits])

    @staticmethod
    def cat(first: Forcing | None, rows_first: int, second: Forcing | None, rows_second: int) -> Forcing | None:
        """Two batches' forcing, rows of `first` then `second`; a batch without any is never forced."""
        if first is None and second is None:
            return None
        some = first if first is not None else second
        assert some is not None

        def part(f: Forcing | None, rows: int, k: int, bits: bool) -> torch.Tensor:
            like = (some.bits if bits else some.where)[k]
            if f is None:
                return torch.zeros((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)
            return (f.bits if bits else f.where)[k]

        scales = range(len(some.where))
        where = [torch.cat((part(first, rows_first, k, False), part(second, rows_second, k, False))) for k in scales]
        bits = [torch.cat((part(first, rows_first, k, True), part(second, rows_second, k, True))) for k in scales]
        return Forcing(where, bits)

    def apply(self, scale_index: int, bits: torch.Tensor) -> torch.Tensor:
        """Sampled bits (B, h, w, d) -> the forced values where forced, the sampled ones elsewhere."""
        return torch.where(self.where[scale_index], self.bits[scale_index], bits)


@dataclass
class _RunningRows:
    """Per-row state of a running batch, so that rows can leave between scales."""

    ids: list[int]
    params: list[SamplingParams]
    rows: RowParams
    generators: list[torch.Generator]
    cond: TextConditioning
    ca_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cache: KVCache
    guided: bool
    nonfinite: torch.Tensor  # (rows,) bool: a logit of this row was inf or NaN at some scale
    forcing: Forcing | None = None

    def drop(self, ids: Collection[int]) -> torch.Tensor:
        """Remove rows by original id; returns the positions kept as a device index (for tensors held
        by the caller). The kept positions are copied to the device, without blocking (`device_index`)."""
        keep = [i for i, rid in enumerate(self.ids) if rid not in ids]
        both = keep + [i + len(self.ids) for i in keep] if self.guided else keep
        index, index_both = device_index(keep, self.cache.keys.device), device_index(both, self.cache.keys.device)
        self.ids = [self.ids[i] for i in keep]
        self.params = [self.params[i] for i in keep]
        self.rows = self.rows.select(keep, index)
        self.generators = [self.generators[i] for i in keep]
        self.cond = self.cond.select(both, index_both)
        self.ca_kv = [(k[index_both], v[index_both]) for k, v in self.ca_kv]
        self.cache = self.cache.select(index_both)
        self.nonfinite = self.nonfinite[index]
        self.forcing = None if self.forcing is None else self.forcing.select(index)
        return index

    def merged_order(self, other: _RunningRows) -> tuple[list[int], torch.Tensor]:
        """Where each model row of the merged batch comes from in cat((self, other)), and the same as a
        device index: the conditional rows of both, then (guided) the unconditional rows of both."""
        a, b = len(self.ids), len(other.ids)
        if self.guided:
            order = [*range(a), *range(2 * a, 2 * a + b), *range(a, 2 * a), *range(2 * a + b, 2 * a + 2 * b)]
        else:
            order = list(range(a + b))
        return order, device_index(order, self.cache.keys.device)

    def absorb(self, other: _RunningRows, id_offset: int, order: list[int], index: torch.Tensor) -> None:
        """Take `other`'s rows after these (ids shifted by `id_offset`), at the same scale of the same
        schedule, both guided or both not; `order`, `index`: `merged_order(other)`. Each row's numbers
        are unchanged: batch invariance makes a row's result independent of its batch-mates, whichever
        batch they came from."""
        assert self.guided == other.guided and self.cache.filled == other.cache.filled
        a, b = len(self.ids), len(other.ids)
        # every new tensor first: out of memory half-way must leave this batch as it was
        forcing = Forcing.cat(self.forcing, a, other.forcing, b)
        rows = self.rows.cat(other.rows)
        cond = TextConditioning.stack([self.cond, other.cond]).select(order, index)
        ca_kv = [(k[index], v[index]) for k, v in cat_padded_kv(self.ca_kv, other.ca_kv)]
        cache = KVCache.merge(self.cache, other.cache, index)
        nonfinite = torch.cat((self.nonfinite, other.nonfinite))
        self.ids = self.ids + [i + id_offset for i in other.ids]
        self.params = self.params + other.params
        self.generators = self.generators + other.generators
        self.forcing, self.rows, self.cond, self.ca_kv, self.cache, self.nonfinite = (
            forcing,
            rows,
            cond,
            ca_kv,
            cache,
            nonfinite,
        )

    def stop_guidance(self) -> None:
        """Every row's cfg is 1 on every remaining scale: keep only the conditional rows (half the
        transformer work and KV cache from here on). With cfg 1 the unconditional logits enter with
        weight 0, so the bits do not change (batch invariance keeps the conditional rows' numbers)."""
        positions = range(len(self.ids))
        index = torch.arange(len(self.ids), device=self.cache.keys.device)  # made on the device: no copy
        self.cond = self.cond.select(positions, index)
        self.ca_kv = [(k[index], v[index]) for k, v in self.ca_kv]
        self.cache = self.cache.select(index)
        self.guided = False


def guide(logits: torch.Tensor, params: list[SamplingParams], scale_index: int, guided: bool) -> torch.Tensor:
    """Temperature then CFG on logits: cfg * l_cond + (1 - cfg) * l_uncond, per row.

    logits: (2B or B, l, V) with conditional rows first -> (B, l, V)
    """
    rows = RowParams.build(params, scale_index + 1, logits.dtype, logits.device)
    return guide_rows(logits, rows, scale_index, guided)


def guide_rows(logits: torch.Tensor, rows: RowParams, scale_index: int, guided: bool) -> torch.Tensor:
    """`guide` with the parameters' tensors built once per request (no host copy here)."""
    B = rows.inv_tau.shape[1]
    inv_tau = rows.inv_tau[scale_index]  # (B, 1, 1)
    if not guided:
        return logits * inv_tau
    return rows.w_cond[scale_index] * (logits[:B] * inv_tau) + rows.w_uncond[scale_index] * (logits[B:] * inv_tau)


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
    if top_k == 1:
        pairs = pairs.masked_fill(pairs < pairs.amax(dim=-1, keepdim=True), float("-inf"))
    if top_p > 0:
        pairs = drop_unlikely_bits(pairs, torch.tensor(1 - top_p, dtype=pairs.dtype, device=pairs.device))
    return pairs.clone()


def drop_unlikely_bits(pairs: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Top-p on bit pairs (..., 2): the minority value becomes -inf where its probability is <= `limit`
    (broadcast against (..., 1); compared in the logits' dtype, as the official `cumsum <= 1 - top_p`)."""
    probs = pairs.softmax(dim=-1)
    minority = pairs.argmin(dim=-1, keepdim=True)
    p_min = probs.gather(-1, minority)
    drop = torch.zeros_like(pairs, dtype=torch.bool).scatter_(-1, minority, p_min <= limit)
    return pairs.masked_fill(drop, float("-inf"))


def sample_bits(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """(B, l, 2D) guided logits -> bits (B, l, D) int64, each row with its own generator."""
    return sample_bits_rows(logits, RowParams.build(params, 1, logits.dtype, logits.device), generators)


def sample_bits_rows(logits: torch.Tensor, rows: RowParams, generators: list[torch.Generator]) -> torch.Tensor:
    """`sample_bits` with the parameters' tensors built once per request: no host sync, and every
    row's filter, softmax and choice in one op each; only the noise is drawn row by row, each row
    from its own generator.

    The draw is `torch.multinomial(probs, 1, replacement=True, generator=g)` as torch computes it
    (argmax of probs / Exp(1) noise, the noise drawn by `exponential_` on g), without its argument
    checks, which read the probabilities back to the host. Same bits for a seed
    (tests/model/test_sampler.py pins them to torch.multinomial).
    """
    B, l, V = logits.shape
    pairs = logits.view(B, l * V // 2, 2)
    # Greedy must not depend on the seed: argmax, an exact tie resolves to bit 0.
    greedy = (pairs[..., 1] > pairs[..., 0]).long() if any(rows.greedy) else None
    if greedy is not None and all(rows.greedy):
        return greedy.view(B, l, V // 2)
    probs = drop_unlikely_bits(pairs, rows.top_p_limit).softmax(dim=-1)
    noise = torch.empty_like(probs)
    for b, generator in enumerate(generators):
        if rows.greedy[b]:
            noise[b].fill_(1.0)  # not drawn: a greedy row leaves its generator untouched
        else:
            noise[b].exponential_(generator=generator)
    drawn = probs.div(noise).argmax(dim=-1)
    bits = drawn if greedy is None else torch.where(rows.greedy_mask, greedy, drawn)
    return bits.view(B, l, V // 2)


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
    forced: Sequence[ForcedBits | None] | None = None,
) -> SampleOutput:
    """Generate the bits of every scale for B prompts: a `Sampling` run to its end."""
    run = Sampling(model, quantizer, schedule, text, uncond_text, params, generators, backend, forced)
    while not run.done:
        run.step(on_scale)
    return run.output()


class Sampling:
    """One batch's scale-by-scale loop, a scale per `step()`: the engine may run other batches' scales
    between two steps (continuous batching), and a batch's bits do not depend on that, since a batch
    owns its KV cache, text and generators and the rows of a batch do not see each other.

    text / uncond_text: raw T5 features of the prompts and of their unconditional counterparts
    (learned null prompt or negative prompt), B rows each. `params` hold a value per scale wherever they
    give a list: the caller checked them (`InfinityPipeline.generate`). `forced`: per row, bits to force
    (image-to-image) or None; a forced bit replaces the sampled one before anything uses it, so every
    later scale is conditioned on it (teacher forcing).
    """

    def __init__(
        self,
        model: Infinity,
        quantizer: BitwiseQuantizer,
        schedule: ScaleSchedule,
        text: TextMemory,
        uncond_text: TextMemory,
        params: list[SamplingParams],
        generators: list[torch.Generator],
        backend: Backend,
        forced: Sequence[ForcedBits | None] | None = None,
    ) -> None:
        self.model, self.quantizer, self.schedule, self.backend = model, quantizer, schedule, backend
        B, n = len(params), schedule.num_scales
        guided = any(p.uses_guidance(n) for p in params)
        cond = model.condition(stack_memories(text, uncond_text) if guided else text, backend)
        c = model.config
        device = text.features.device
        cache = KVCache.allocate(
            c.depth, 2 * B if guided else B, c.num_heads, schedule.total_tokens, c.head_dim, model.blocks_dtype, device
        )
        self.state = _RunningRows(
            list(range(B)),
            list(params),
            RowParams.build(params, n, torch.float32, device),  # model.logits are float32
            list(generators),
            cond,
            model.cross_kv(cond),
            cache,
            guided,
            torch.zeros(B, dtype=torch.bool, device=device),
        )
        self.vae_scales = schedule.vae_scales(quantizer.config.spatial_patchify)
        self.state.forcing = Forcing.build(forced or [None] * B, self.vae_scales, quantizer.config.bits, device)
        self.x = model.start_tokens(cond)  # (rows, 1, C): the next scale's inputs
        self.latent: torch.Tensor | None = None
        self.bits: list[torch.Tensor] = []
        self.seconds: list[float] = []
        self.scale_index = 0

    @property
    def done(self) -> bool:
        """Every scale sampled, or every row dropped."""
        return self.scale_index >= self.schedule.num_scales or not self.state.ids

    @property
    def rows(self) -> tuple[int, ...]:
        """Original index of each row still running."""
        return tuple(self.state.ids)

    def step(self, on_scale: ScaleCallback | None = None) -> ScaleEvent:
        """Sample the next scale; `on_scale` sees it and names rows to drop before the next one."""
        si, n, state, quantizer = self.scale_index, self.schedule.num_scales, self.state, self.quantizer
        h, w = self.schedule.scales[si]
        # After scale 0 nothing here reads a device value back (tests/model/test_syncs.py counts them
        # in these profiler ranges): the host can queue the next scale while the device runs this one.
        with torch.profiler.record_function(f"{SCALE_RANGE} {si}"):
            t0 = time.perf_counter()
            raw = self.model.step(self.x, si, self.schedule, state.cond, state.ca_kv, state.cache, self.backend)
            logits, bad = quarantine_nonfinite(guide_rows(raw, state.rows, si, state.guided))
            state.nonfinite |= bad
            token_bits = sample_bits_rows(logits, state.rows, state.generators).view(len(state.ids), h, w, -1)
            bits = quantizer.to_latent_layout(token_bits)  # (B, h', w', d)
            if state.forcing is not None:
                bits = state.forcing.apply(si, bits)
            latent = quantizer.accumulate(self.latent, quantizer.codes(bits, si), self.vae_scales[-1])
            self.bits.append(bits.to(torch.uint8))
            self.seconds.append(time.perf_counter() - t0)
            event = ScaleEvent(si, n, tuple(state.ids), latent, self.seconds[-1])
            dropped = on_scale(event) if on_scale else None
            if dropped:
                keep = state.drop(set(dropped))
                latent, self.bits = latent[keep], [b[keep] for b in self.bits]
            self.latent, self.scale_index = latent, si + 1
            if si + 1 < n and state.ids:
                if state.guided and not any(p.uses_guidance(n, start=si + 1) for p in state.params):
                    state.stop_guidance()  # cfg 1 from here on, for every row
                x = self.model.embed_bits(quantizer.next_inputs(latent, self.vae_scales[si + 1]))
                self.x = torch.cat((x, x)) if state.guided else x
        return event

    def can_absorb(self, other: Sampling) -> bool:
        """`other` is at the same point of the same schedule, on the same model: their rows can run as one
        batch from here (continuous batching merges a request that caught up with a running one)."""
        return (
            other is not self
            and other.model is self.model
            and other.schedule == self.schedule
            and other.scale_index == self.scale_index
            and 0 < self.scale_index < self.schedule.num_scales
            and other.state.guided == self.state.guided
            and bool(self.state.ids and other.state.ids)
        )

    def absorb(self, other: Sampling, id_offset: int) -> None:
        """Merge `other`'s rows into this batch (see `can_absorb`); their ids become `id_offset + id`.
        The merged cache is allocated anew for both (then the two old ones are freed)."""
        assert self.can_absorb(other)
        assert self.latent is not None and other.latent is not None
        order, index = self.state.merged_order(other.state)
        x = torch.cat((self.x, other.x))[index]
        latent = torch.cat((self.latent, other.latent))
        bits = [torch.cat((p, q)) for p, q in zip(self.bits, other.bits, strict=True)]
        self.state.absorb(other.state, id_offset, order, index)  # the last step that may run out of memory
        self.x, self.latent, self.bits = x, latent, bits
        self.seconds = [p + q for p, q in zip(self.seconds, other.seconds, strict=True)]

    def output(self) -> SampleOutput:
        """The bits and latent of the rows that ran to the end (call once `done`)."""
        assert self.latent is not None, "no scale sampled yet"
        state = self.state
        nonfinite = tuple(rid for rid, bad in zip(state.ids, state.nonfinite.tolist(), strict=True) if bad)
        return SampleOutput(tuple(state.ids), nonfinite, self.bits, self.latent, self.seconds)
