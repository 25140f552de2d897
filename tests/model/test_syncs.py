"""After the first scale the sampler never waits for the device (issue 18, item 5).

A host sync (reading a device value: `.item()`, `.tolist()`, `int(t)`, a boolean-mask compaction, the
argument checks of `torch.multinomial`) stalls the host until the device has run everything queued,
so the host cannot queue the next scale while the device runs this one; a tensor made from Python
data is a blocking host-to-device copy on CUDA. Counted on CPU with the profiler (the aten ops that
read back) and a TorchFunctionMode (Python-level reads: on CPU a `.tolist()` dispatches no aten op),
inside the sampler's per-scale profiler ranges ("sampler scale k").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from model.attention import TextMemory
from model.config import TRANSFORMER_SIZES, VAE_SIZES, SamplingParams
from model.image_condition import ForcedBits
from model.quantizer import BitwiseQuantizer
from model.sampler import SCALE_RANGE, ScaleCallback, ScaleEvent, sample
from model.schedules import ScaleSchedule
from model.transformer import Infinity
from tests.conftest import make_transformer

SCHEDULE = ScaleSchedule.official(1.0, "0.06M")  # 7 scales
QUANT = BitwiseQuantizer(VAE_SIZES["tiny"])
# aten ops that read a device value on the host, and torch.tensor(python data): a blocking copy on CUDA
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"})
HOST_COPY_OPS = frozenset({"aten::lift_fresh"})
HOST_READS = frozenset({"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"})


class HostReads(TorchFunctionMode):
    """Python reads of tensor values, by scale; the sampler's on_scale callback advances `scale`."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 0
        self.seen: Counter[tuple[int, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.seen[(self.scale, name)] += 1
        return func(*args, **(kwargs or {}))


def scale_of(event) -> int | None:
    """The scale whose profiler range holds `event`, or None outside the loop."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(SCALE_RANGE + " "):
            return int(parent.name.rsplit(" ", 1)[1])
        parent = parent.cpu_parent
    return None


def host_waits_after_scale_0(
    model: Infinity,
    lengths: list[int],
    params: list[SamplingParams],
    callback: Callable[[ScaleEvent], object] | None = None,
    forced: list[ForcedBits | None] | None = None,
) -> Counter[str]:
    """Run the real sampler; count every sync op, host copy and value read in scales 1.. by name."""
    g = torch.Generator().manual_seed(0)
    size = torch.tensor(lengths)
    feats = torch.randn(len(lengths), max(lengths), model.config.text_channels, generator=g)
    memory = TextMemory(feats * (torch.arange(max(lengths))[None, :, None] < size[:, None, None]), size)
    gens = [torch.Generator().manual_seed(p.seed or 0) for p in params]
    reads = HostReads()

    def on_scale(event: ScaleEvent):
        dropped = callback(event) if callback else None
        reads.scale = event.scale_index + 1  # what follows belongs to the next scale
        return dropped

    with torch.inference_mode():
        uncond = model.unconditional_text(memory.lengths)
        with profile(activities=[ProfilerActivity.CPU]) as prof, reads:
            out = sample(model, QUANT, SCHEDULE, memory, uncond, params, gens, "sdpa", on_scale, forced)
    assert len(out.bits) == SCHEDULE.num_scales
    waits: Counter[str] = Counter()
    for e in prof.events():
        if e.name in SYNC_OPS | HOST_COPY_OPS and (scale_of(e) or 0) >= 1:
            waits[e.name] += 1
    for (scale, name), n in reads.seen.items():
        if 1 <= scale < SCHEDULE.num_scales:
            waits[f"Tensor.{name}"] += n
    return waits


MIXED = [
    SamplingParams(cfg=3.0, tau=1.0, seed=1),  # sampled, top-p 0.97
    SamplingParams(cfg=4.0, tau=(0.5,) * 7, top_k=2, top_p=0.0, seed=2),  # sampled, unfiltered
    SamplingParams(cfg=(2.0,) * 3 + (1.0,) * 4, top_k=1, seed=3),  # greedy
]


@pytest.mark.parametrize("invariant", [True, False])
def test_no_scale_after_the_first_waits_for_the_device(invariant):
    model = make_transformer(TRANSFORMER_SIZES["tiny"]).eval().set_batch_invariant(invariant)
    assert host_waits_after_scale_0(model, [5, 3, 7], MIXED) == Counter()


def test_guidance_stopping_midway_does_not_wait_either():
    # cfg 1 for every row from scale 3 on: the unconditional rows leave the batch there
    params = [SamplingParams(cfg=(3.0,) * 3 + (1.0,) * 4, seed=s, top_k=k) for s, k in ((1, 0), (2, 1))]
    model = make_transformer(TRANSFORMER_SIZES["tiny"]).eval().set_batch_invariant(True)
    assert host_waits_after_scale_0(model, [4, 6], params) == Counter()


def test_forced_bits_of_image_to_image_rows_do_not_wait_either():
    model = make_transformer(TRANSFORMER_SIZES["tiny"]).eval().set_batch_invariant(True)
    g = torch.Generator().manual_seed(0)
    scales = SCHEDULE.vae_scales(False)
    image = ForcedBits(
        [torch.rand(h, w, generator=g) < 0.5 for h, w in scales],  # a mask's pattern, every scale
        [torch.randint(0, 2, (h, w, QUANT.config.bits), generator=g) for h, w in scales],
    )
    assert host_waits_after_scale_0(model, [5, 3, 7], MIXED, forced=[image, None, image]) == Counter()


def test_a_dropped_row_costs_no_read_back_and_only_a_non_blocking_copy():
    model = make_transformer(TRANSFORMER_SIZES["tiny"]).eval().set_batch_invariant(True)
    drop: ScaleCallback = lambda e: {1} if e.scale_index == 2 else None  # noqa: E731
    waits = host_waits_after_scale_0(model, [5, 3, 7], MIXED, drop)
    # The kept positions go to the device once (pinned and non-blocking on CUDA: model.sampler.device_index).
    assert set(waits) <= HOST_COPY_OPS, waits


def test_the_count_sees_a_read_back_in_the_loop():
    # The power of the tests above: a `.tolist()` of a device tensor dispatches no aten op on CPU, and
    # `.item()` does; both in a later scale must be counted.
    model = make_transformer(TRANSFORMER_SIZES["tiny"]).eval().set_batch_invariant(True)

    def read_back(event: ScaleEvent) -> None:
        if event.scale_index == 3:
            event.latent.flatten()[:2].tolist()
            event.latent.sum().item()

    waits = host_waits_after_scale_0(model, [5, 3], MIXED[:2], read_back)
    assert waits["Tensor.tolist"] == 1 and waits["Tensor.item"] == 1 and waits["aten::_local_scalar_dense"] == 1
