"""Dispatch and host-sync counts of the scale loop, on the tiny model where dispatch dominates.

    python -m tests.bench.dispatch_bench

Three tables (issue 18, item 5), all measurable on CPU:
- host syncs per scale: profiler events that wait for the device (`aten::_local_scalar_dense`,
  `aten::nonzero`), tensors made from Python data (`aten::lift_fresh`:
  a host-to-device copy on CUDA) and Python reads of tensor values (`.tolist()`, `int(t)`, ...: on CPU
  a `.tolist()` dispatches no aten op, so only a TorchFunctionMode sees it);
- ops per block per scale: aten ops one block's forward dispatches at one scale (TorchDispatchMode sees
  the kernels called; the profiler also counts the ops they call inside);
- per-scale overhead: seconds per scale of the real sampler on the tiny model.
Scales are delimited by the sampler's `on_scale` callback, so this runs on any version of the sampler.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention import TextMemory
from model.config import TRANSFORMER_SIZES, VAE_SIZES, SamplingParams
from model.quantizer import BitwiseQuantizer
from model.sampler import SampleOutput, sample
from model.schedules import ScaleSchedule
from model.transformer import Infinity
from tests.conftest import make_transformer

# A device value read by the host (`item`, `is_nonzero` and `_assert_async` on CPU call it), and boolean
# compaction (its output size is data-dependent): each waits for the device.
SYNC_EVENTS = ("aten::_local_scalar_dense", "aten::nonzero")
HOST_COPY_EVENTS = ("aten::lift_fresh",)  # torch.tensor(list, device=...): a blocking copy on CUDA
# Python-level reads of a tensor's values: each one waits for the device.
HOST_READS = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"})
SCHEDULE = ScaleSchedule.official(1.0, "0.06M")  # 7 scales
QUANT = BitwiseQuantizer(VAE_SIZES["tiny"])
MARK = "scale_end"


def tiny_model(batch_invariant: bool) -> Infinity:
    return make_transformer(TRANSFORMER_SIZES["tiny"]).eval().set_batch_invariant(batch_invariant)


def mixed_batch(channels: int = 32) -> tuple[TextMemory, list[SamplingParams]]:
    """Three prompts of different lengths; CFG on; sampled rows (top-k 0 and 2) beside a greedy one."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 3, 7])
    feats = torch.randn(3, 7, channels, generator=g) * (torch.arange(7)[None, :, None] < lengths[:, None, None])
    params = [
        SamplingParams(cfg=3.0, tau=1.0, seed=1),
        SamplingParams(cfg=4.0, tau=0.5, top_k=2, top_p=0.9, seed=2),
        SamplingParams(cfg=2.0, top_k=1, seed=3),
    ]
    return TextMemory(feats, lengths), params


def run_sampler(model: Infinity, memory: TextMemory, params: list[SamplingParams], on_scale=None) -> SampleOutput:
    gens = [torch.Generator().manual_seed(p.seed or 0) for p in params]
    with torch.inference_mode():
        uncond = model.unconditional_text(memory.lengths)
        return sample(model, QUANT, SCHEDULE, memory, uncond, params, gens, "sdpa", on_scale)


# ---- host syncs -------------------------------------------------------------------------------
class HostReads(TorchFunctionMode):
    """Counts Python reads of tensor values, per scale (the caller advances `scale`)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 0
        self.reads: Counter[tuple[int, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads[(self.scale, name)] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class SyncCounts:
    syncs: list[int] = field(default_factory=list)  # per scale: profiler sync events
    host_copies: list[int] = field(default_factory=list)  # per scale: tensors from Python data
    reads: list[int] = field(default_factory=list)  # per scale: Python reads of tensor values


def count_syncs(model: Infinity) -> SyncCounts:
    """Per scale, on a 3-prompt CFG batch; scale k ends at the k-th on_scale call."""
    memory, params = mixed_batch(model.config.text_channels)
    reads = HostReads()

    def mark(event) -> None:
        with record_function(MARK):
            pass
        reads.scale += 1

    with profile(activities=[ProfilerActivity.CPU]) as prof, reads:
        run_sampler(model, memory, params, on_scale=mark)
    ends = sorted(e.time_range.start for e in prof.events() if e.name == MARK)
    counts = SyncCounts([0] * len(ends), [0] * len(ends), [0] * len(ends))
    for e in prof.events():
        if e.name in SYNC_EVENTS or e.name in HOST_COPY_EVENTS:
            scale = sum(e.time_range.start > end for end in ends)
            if scale < len(ends):
                target = counts.syncs if e.name in SYNC_EVENTS else counts.host_copies
                target[scale] += 1
    for (scale, _), n in reads.reads.items():
        if scale < len(ends):
            counts.reads[scale] += n
    return counts


# ---- ops per block ----------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_block(model: Infinity, batch: int = 1) -> tuple[list[int], list[int]]:
    """Per scale: aten ops dispatched by block 0's forward (dispatch mode; profiler events)."""
    memory, params = mixed_batch(model.config.text_channels)
    memory = TextMemory(memory.features[:batch], memory.lengths[:batch])
    dispatched: list[int] = []
    profiled: list[int] = []
    block = model.block_list[0]
    state: dict[str, Any] = {}

    def before(module, args) -> None:
        state["prof"] = profile(activities=[ProfilerActivity.CPU]).__enter__()
        state["mode"] = OpCounter().__enter__()

    def after(module, args, output) -> None:
        mode = state.pop("mode")
        mode.__exit__(None, None, None)
        prof = state.pop("prof")
        prof.__exit__(None, None, None)
        dispatched.append(mode.ops)
        profiled.append(sum(1 for e in prof.events() if e.name.startswith("aten::")))

    handles = [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    try:
        run_sampler(model, memory, params[:batch])
    finally:
        for h in handles:
            h.remove()
    return dispatched, profiled


# ---- per-scale overhead -----------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleSeconds:
    first: float  # scale 0 (setup of the request's tensors included)
    small: float  # mean of scales 1-3 (<= 36 tokens): dispatch dominates
    later: float  # mean of scales 1..


def seconds_per_scale(model: Infinity, batch: int = 1, repeats: int = 30) -> ScaleSeconds:
    """Seconds per scale on the tiny model, each the fastest of `repeats` runs (noise from a shared CPU
    only ever adds)."""
    memory, params = mixed_batch(model.config.text_channels)
    memory = TextMemory(memory.features[:batch], memory.lengths[:batch])
    run_sampler(model, memory, params[:batch])  # warm-up
    runs = [run_sampler(model, memory, params[:batch]).scale_seconds for _ in range(repeats)]
    return ScaleSeconds(
        min(r[0] for r in runs),
        min(statistics.mean(r[1:4]) for r in runs),
        min(statistics.mean(r[1:]) for r in runs),
    )


def report() -> None:
    print("\n| batch-invariant | host syncs per scale (scale 0 / later, each) | host copies | value reads |")
    print("|---|---|---|---|")
    for invariant in (True, False):
        c = count_syncs(tiny_model(invariant))
        print(
            f"| {'on' if invariant else 'off'} | {c.syncs[0]} / {', '.join(map(str, c.syncs[1:]))} | "
            f"{c.host_copies[0]} / {', '.join(map(str, c.host_copies[1:]))} | "
            f"{c.reads[0]} / {', '.join(map(str, c.reads[1:]))} |"
        )
    print(
        "\n| batch-invariant | batch (CFG: 2 rows each) | ops per block per scale: dispatched | profiler aten events |"
    )
    print("|---|---|---|---|")
    for invariant in (True, False):
        for batch in (1, 3):
            dispatched, profiled = ops_per_block(tiny_model(invariant), batch)
            print(
                f"| {'on' if invariant else 'off'} | {batch} | {statistics.median(dispatched):.0f} "
                f"(scale 0..{len(dispatched) - 1}: {min(dispatched)}-{max(dispatched)}) | "
                f"{statistics.median(profiled):.0f} |"
            )
    print("\n| batch-invariant | batch | tiny model, s per scale: scales 1-3 (<= 36 tokens) | scales 1.. | scale 0 |")
    print("|---|---|---|---|---|")
    for invariant in (True, False):
        for batch in (1, 3):
            t = seconds_per_scale(tiny_model(invariant), batch)
            print(
                f"| {'on' if invariant else 'off'} | {batch} | {t.small * 1e3:.2f} ms | {t.later * 1e3:.2f} ms | "
                f"{t.first * 1e3:.2f} ms |"
            )


if __name__ == "__main__":
    torch.set_num_threads(1)  # dispatch overhead, not kernel time: one thread, steadier numbers
    start = time.perf_counter()
    report()
    print(f"\n({time.perf_counter() - start:.0f} s)")
