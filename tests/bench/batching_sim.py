"""What any scale-boundary scheduler could reach on this machine: measured step costs, simulated queues.

    python -m tests.bench.batching_sim                  # the shipped default model
    python -m tests.bench.batching_sim --shape mid      # random weights, bf16, 0.06M

Open-loop latency on 2 cores is noisy (hundreds of requests per rate move a p95 by 20%), and it mixes
the scheduler with HTTP, PNG encoding and the load generator. This benchmark separates them. It
measures, in this process, what one step of each scale costs with 1, 2, 4 and 8 requests in it
(`Generation.step`, CFG rows included) and what one image's decode costs, then replays thousands of
Poisson arrivals (several seeds) through three schedulers on those costs:

- `static`: the static batcher (a batch forms when the worker is free and runs every scale);
- `continuous`: server/continuous.py's policy: a cohort admitted at every boundary, cohorts at
  different scales run one after the other, a leader waits for a laggard by the served catch-up rule
  (`worth_waiting`) and equal scales merge;
- `fused`: an ideal that no code here implements: every row in flight, whatever its scale, runs in
  one pass per boundary that pays the fixed per-step cost once (the intercept of the first scale's
  cost in rows) plus each scale's marginal cost for its rows.

Decodes run on the worker, one image at a time, each request delivered after its own. Latency ratios
are to the lone request's simulated latency; loads are fractions of the static batcher's simulated
saturation. Costs between measured row counts are interpolated linearly (extrapolated past 8).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import RuntimeConfig, SamplingParams
from model.pipeline import InfinityPipeline
from model.schedules import ScaleSchedule
from server.continuous import worth_waiting
from server.main import in_own_thread
from tests.bench.prompts import PROMPTS
from tests.bench.server_bench import engine_open_loop, percentile, poisson

MAX_WAIT_S = 0.010  # the served default `max_wait_ms`


@dataclass(frozen=True)
class StepCosts:
    """Seconds of one step of each scale at each measured row count, and of one image's decode."""

    rows: tuple[int, ...]  # the measured row counts, ascending (requests; CFG doubles them inside)
    scales: tuple[tuple[float, ...], ...]  # scales[s][i]: scale s with rows[i] requests
    decode: float  # one image
    start: tuple[float, ...] = ()  # start[i]: `InfinityPipeline.start` (text encoding) of rows[i]; () none

    def step(self, scale: int, rows: int) -> float:
        return self._at(self.scales[scale], rows)

    def starting(self, rows: int) -> float:
        """Starting a batch (or cohort) of `rows` requests: its text encoding and conditioning."""
        return self._at(self.start, rows) if self.start else 0.0

    def _at(self, costs: tuple[float, ...], rows: int) -> float:
        """Linear between measured row counts, extrapolated from the last two past the end."""
        ks = self.rows
        i = next((j for j, k in enumerate(ks) if k >= rows), len(ks) - 1)
        if ks[i] == rows or i == 0:
            return costs[i]
        return costs[i - 1] + (costs[i] - costs[i - 1]) * (rows - ks[i - 1]) / (ks[i] - ks[i - 1])

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def overhead(self) -> float:
        """The fixed cost of a step whatever its rows: the first scale's cost line at zero rows."""
        c1, c2 = self.step(0, 1), self.step(0, 2)
        return max(0.0, 2 * c1 - c2)

    def batch(self, rows: int) -> float:
        return sum(self.step(s, rows) for s in range(self.num_scales))

    def lone(self) -> float:
        return self.starting(1) + self.batch(1) + self.decode


Scheduler = Callable[[StepCosts, Sequence[float], int], list[float]]


def static(costs: StepCosts, arrivals: Sequence[float], max_batch: int, max_wait: float = MAX_WAIT_S) -> list[float]:
    """Latency of each arrival (in order) under the static batcher (server/batcher.py `take`): when the
    worker is free the waiting requests leave as one batch, after up to `max_wait` past the first one's
    arrival for a fuller batch if the last batch held several requests (under load, not for a lone one)."""
    latencies, now, i, patient = [], 0.0, 0, False
    while i < len(arrivals):
        leave = max(now, arrivals[i])
        full_at = arrivals[i + max_batch - 1] if i + max_batch <= len(arrivals) else math.inf
        if patient and full_at > leave:
            leave = max(leave, min(arrivals[i] + max_wait, full_at))
        j = i
        while j < len(arrivals) and arrivals[j] <= leave and j - i < max_batch:
            j += 1
        now = leave + costs.starting(j - i) + costs.batch(j - i)
        for a in arrivals[i:j]:
            now += costs.decode
            latencies.append(now - a)
        patient, i = j - i > 1, j
    return latencies


@dataclass
class _Cohort:
    scale: int
    requests: list[int]  # indices into the arrivals


def _boundary(
    costs: StepCosts, arrivals: Sequence[float], max_batch: int, step: Callable[[list[_Cohort]], float]
) -> list[float]:
    """The continuous loop's skeleton: at each boundary admit what fits as a new cohort, merge cohorts
    at the same scale, then `step` the running cohorts (it advances the due ones, returns the seconds)."""
    latencies = [0.0] * len(arrivals)
    running: list[_Cohort] = []
    now, i = 0.0, 0
    while i < len(arrivals) or running:
        if not running:
            now = max(now, arrivals[i])
        free = max_batch - sum(len(c.requests) for c in running)
        admitted = []
        while i < len(arrivals) and arrivals[i] <= now and len(admitted) < free:
            admitted.append(i)
            i += 1
        if admitted:
            now += costs.starting(len(admitted))
            running.append(_Cohort(0, admitted))
        running = _merged(running)
        now += step(running)
        for cohort in [c for c in running if c.scale == costs.num_scales]:
            for r in cohort.requests:
                now += costs.decode
                latencies[r] = now - arrivals[r]
        running = [c for c in running if c.scale < costs.num_scales]
    return latencies


def _merged(running: list[_Cohort]) -> list[_Cohort]:
    by_scale: dict[int, _Cohort] = {}
    for cohort in running:  # oldest first: a merge keeps the earlier cohort's place
        if cohort.scale in by_scale:
            by_scale[cohort.scale].requests.extend(cohort.requests)
        else:
            by_scale[cohort.scale] = cohort
    return list(by_scale.values())


def continuous(costs: StepCosts, arrivals: Sequence[float], max_batch: int) -> list[float]:
    """server/continuous.py's policy, its catch-up rule on the costs of one row per scale."""
    lone = [costs.step(s, 1) for s in range(costs.num_scales)]

    def step(running: list[_Cohort]) -> float:
        seconds = 0.0
        for cohort in [c for c in running if _due(c, running, lone)]:
            seconds += costs.step(cohort.scale, len(cohort.requests))
            cohort.scale += 1
        return seconds

    return _boundary(costs, arrivals, max_batch, step)


def _due(cohort: _Cohort, running: list[_Cohort], scale_costs: list[float]) -> bool:
    laggards = [c.scale for c in running if c.scale < cohort.scale]
    return not (laggards and worth_waiting(scale_costs, max(laggards), cohort.scale))


def fused(costs: StepCosts, arrivals: Sequence[float], max_batch: int) -> list[float]:
    """The ideal: one pass per boundary over every row in flight, the fixed step cost paid once."""
    fixed = costs.overhead

    def step(running: list[_Cohort]) -> float:
        seconds = fixed + sum(costs.step(c.scale, len(c.requests)) - fixed for c in running)
        for cohort in running:
            cohort.scale += 1
        return seconds

    return _boundary(costs, arrivals, max_batch, step)


SCHEDULERS: dict[str, Scheduler] = {"static": static, "continuous": continuous, "fused": fused}


def saturation(scheduler: Scheduler, costs: StepCosts, max_batch: int, count: int = 400) -> float:
    """Images per second with `count` requests all waiting at once (full batches one after the other,
    whatever the scheduler: the loads are fractions of this)."""
    latencies = scheduler(costs, [0.0] * count, max_batch)
    return count / max(latencies)


@dataclass(frozen=True)
class Outcome:
    p50: float  # ratios to the lone request's latency, means over the seeds
    p95: float
    p99: float


def simulate(scheduler: Scheduler, costs: StepCosts, rate: float, requests: int, seeds: int, max_batch: int) -> Outcome:
    lone, runs = costs.lone(), []
    for seed in range(seeds):
        latencies = scheduler(costs, poisson(rate, requests, seed), max_batch)
        runs.append([percentile(latencies, q) / lone for q in (0.5, 0.95, 0.99)])
    return Outcome(*(sum(r[i] for r in runs) / seeds for i in range(3)))


# ---- measuring the costs ---------------------------------------------------------------------------


def measure(pipe: InfinityPipeline, schedule: ScaleSchedule, rows: Sequence[int], repeats: int) -> StepCosts:
    """Fastest of `repeats` per scale and row count (and for the start); the decode per image, over
    every measured run. Prompts as the validation sends them (text features cached after first use)."""
    pipe.generate(["warm-up"], schedule, SamplingParams(seed=0))
    per_rows, decodes, starts = [], [], []
    for k in rows:
        best: list[float] | None = None
        start = math.inf
        for r in range(repeats):
            prompts = [PROMPTS[(r * k + j) % len(PROMPTS)] for j in range(k)]
            t0 = time.perf_counter()
            generation = pipe.start(prompts, schedule, [SamplingParams(seed=j) for j in range(k)])
            start = min(start, time.perf_counter() - t0)
            steps = []
            while not generation.done:
                t0 = time.perf_counter()
                generation.step()
                steps.append(time.perf_counter() - t0)
            for j in range(k):
                t0 = time.perf_counter()
                generation.finish([j])
                decodes.append(time.perf_counter() - t0)
            best = steps if best is None else [min(a, b) for a, b in zip(best, steps, strict=True)]
        per_rows.append(best or [])
        starts.append(start)
    scales = tuple(tuple(per_rows[i][s] for i in range(len(rows))) for s in range(schedule.num_scales))
    return StepCosts(tuple(rows), scales, min(decodes), tuple(starts))


def validate(
    pipe: InfinityPipeline, schedule: ScaleSchedule, costs: StepCosts, load: float, requests: int, max_batch: int
) -> None:
    """The real in-process Engine (no HTTP) in each mode under Poisson arrivals at `load` of the simulated
    static saturation, against the simulation of the very same arrival times: how far to trust it."""
    from server.engine import Engine
    from server.metrics import Metrics

    rate = load * saturation(static, costs, max_batch)
    arrivals = poisson(rate, requests, seed=0)  # engine_open_loop's arrivals, seed 0
    print(f"\n# validation: {requests} arrivals at {rate:.2f}/s ({load:.0%}), in-process engine vs simulated\n")
    print("| batching | measured lone s | p50 / lone | p95 / lone | simulated lone s | p50 / lone | p95 / lone |")
    print("|---|---|---|---|---|---|---|")
    for mode, scheduler in (("static", static), ("continuous", continuous)):
        engine = Engine(
            {"cpu": pipe}, Metrics().for_model("sim"), max_batch, MAX_WAIT_S * 1000, 4 * requests, batching=mode
        )
        engine.start()
        try:
            lone = statistics.median(engine_open_loop(engine, schedule, 0.0, 1)["p50"] for _ in range(9))
            run = engine_open_loop(engine, schedule, rate, requests)
        finally:
            engine.drain(600)
        simulated = scheduler(costs, arrivals, max_batch)
        sim_p50, sim_p95 = (percentile(simulated, q) / costs.lone() for q in (0.5, 0.95))
        print(
            f"| {mode} | {lone:.3f} | {run['p50'] / lone:.2f}x | {run['p95'] / lone:.2f}x | "
            f"{costs.lone():.3f} | {sim_p50:.2f}x | {sim_p95:.2f}x |"
        )


def load_pipeline(shape: str | None) -> tuple[InfinityPipeline, ScaleSchedule, str]:
    if shape is None:
        from weights.default import load_default_pipeline

        pipe, default = load_default_pipeline(RuntimeConfig())
        return pipe, default.schedule or ScaleSchedule.official(1.0, default.pn), "the default model"
    from tests.bench.perf_bench import pipeline as random_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        pipe = random_pipeline(shape, "bfloat16", torch.device("cpu"), "off", Path(tmp))
    return pipe, ScaleSchedule.official(1.0, "0.06M"), f"the {shape} shape (random weights, bf16, 0.06M)"


# ---- the report ------------------------------------------------------------------------------------


def print_costs(costs: StepCosts, what: str) -> None:
    print(f"# step costs, {what}: ms per step by requests in it (and the batching gain k*c(1)/c(k))")
    print()
    print("| scale | " + " | ".join(f"{k} req" for k in costs.rows) + f" | gain at {costs.rows[-1]} |")
    print("|---" * (len(costs.rows) + 2) + "|")
    for s, row in enumerate(costs.scales):
        gain = costs.rows[-1] * row[0] / row[-1]
        print(f"| {s} | " + " | ".join(f"{c * 1e3:.1f}" for c in row) + f" | {gain:.2f}x |")
    k = costs.rows[-1]
    whole = k * costs.lone() / (costs.starting(k) + costs.batch(k) + k * costs.decode)
    if costs.start:
        gain = k * costs.start[0] / costs.start[-1]
        print("| start (text) | " + " | ".join(f"{c * 1e3:.1f}" for c in costs.start) + f" | {gain:.2f}x |")
    print(
        f"| decode | {costs.decode * 1e3:.1f} per image | | | | |\n\nlone {costs.lone() * 1e3:.1f} ms, "
        f"fixed cost per step {costs.overhead * 1e3:.1f} ms, whole-request batching gain at "
        f"{costs.rows[-1]}: {whole:.2f}x"
    )


def report(costs: StepCosts, loads: Sequence[float], requests: int, seeds: int, max_batch: int) -> None:
    static_saturation = saturation(static, costs, max_batch)
    print()
    print(
        f"# simulated: {requests} Poisson arrivals x {seeds} seeds per rate, max_batch_size {max_batch}; "
        f"static saturation {static_saturation:.2f} images/s"
    )
    print()
    print("| arrivals / s (of static saturation) | scheduler | p50 / lone | p95 / lone | p99 / lone |")
    print("|---|---|---|---|---|")
    for load in loads:
        rate = load * static_saturation
        for name, scheduler in SCHEDULERS.items():
            o = simulate(scheduler, costs, rate, requests, seeds, max_batch)
            print(f"| {rate:.2f} ({load:.0%}) | {name} | {o.p50:.2f}x | {o.p95:.2f}x | {o.p99:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", help="a random-weight shape (e.g. mid) instead of the shipped default model")
    parser.add_argument("--requests", type=int, default=3000, help="simulated arrivals per rate and seed")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--loads", default="0.3,0.5,0.7", help="fractions of the static batcher's saturation")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per row count (fastest kept)")
    parser.add_argument("--validate", type=int, default=0, help="then this many real requests per mode at 70%%")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    # Torch work off the main thread, as `serve` does it: a pool on the main thread would halve the
    # validation engine's worker (two OpenMP pools on 2 cores: server/main.py `in_own_thread`).
    pipe, schedule, what = in_own_thread(load_pipeline, args.shape)
    rows = tuple(k for k in (1, 2, 4, 8) if k <= args.max_batch)
    costs = in_own_thread(measure, pipe, schedule, rows, args.repeats)
    print_costs(costs, f"{what}, {torch.get_num_threads()} threads")
    report(costs, [float(x) for x in args.loads.split(",")], args.requests, args.seeds, args.max_batch)
    if args.validate:
        validate(pipe, schedule, costs, 0.7, args.validate, args.max_batch)


if __name__ == "__main__":
    main()
