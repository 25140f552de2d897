"""server/replica.py alone: a worker thread over a real admission queue and a stand-in pipeline whose
failures the test chooses. A failed batch is bisected until only the failing request fails; a dead
worker is restarted within its budget and retired past it; the warm-up runs before serving.
(Replicas on the real engine and pipeline, through the API: test_replicas_api.py, test_worker_faults.py.)"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from model.config import SamplingParams
from model.memory import MemoryUsage
from model.pipeline import DeviceOutOfMemory, GenerationResult, StageTimings
from model.schedules import ScaleSchedule
from server.admission import Admission
from server.batcher import Batcher, Ticket
from server.errors import ServingError
from server.jobs import GenerationRequest
from server.metrics import Metrics
from server.replica import Replica, RestartPolicy, Warmup

SCHEDULE = ScaleSchedule.custom(((1, 1), (2, 2)))


class ThreadKill(BaseException):
    """Escapes every `except Exception`: what a fatal error inside the worker looks like."""


class FakePipeline:
    """Answers `generate` at once; prompts in `poison` raise, prompts in `oom` run out of memory."""

    def __init__(self, poison=(), oom=()) -> None:
        self.poison, self.oom = set(poison), set(oom)
        self.calls: list[list[str]] = []
        self.text_encoder = object()  # owns the text cache, which the metrics count lookups of

    def generate(self, prompts, schedule, params, on_scale=None, images=None) -> GenerationResult:
        self.calls.append(list(prompts))
        if self.oom & set(prompts):
            raise DeviceOutOfMemory("out of memory")
        if self.poison & set(prompts):
            raise RuntimeError("this prompt breaks the model")
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        n = len(prompts)
        return GenerationResult(
            rows=tuple(range(n)),
            nonfinite=(),
            images=[np.zeros((2, 2, 3), np.uint8)] * n,
            bits=[],
            seeds=[p.seed for p in params],
            prompt_tokens=[1] * n,
            image_tokens=5,
            timings=StageTimings(0.0, 0.0, 0.0, ()),
        )

    def text_cache_stats(self) -> dict[str, int]:
        return {"hits": 0, "misses": 0, "entries": 0, "bytes": 0}

    def memory_bytes(self) -> MemoryUsage:
        return MemoryUsage({"rss": 1}, {"rss": 1})


class Harness:
    """One replica over a real queue; tickets put before `start` leave as one batch."""

    def __init__(self, pipeline: FakePipeline, policy: RestartPolicy | None = None, may_restart=lambda: True) -> None:
        self.metrics = Metrics().for_model("m")
        admission: Admission | None = None
        queue = Batcher(8, 0.0, 64, on_take=lambda batch: admission.running(batch))
        self.admission = admission = Admission(queue, self.metrics, 1, lambda schedule, guided: 0)
        self.retired = threading.Event()
        self.replica = Replica(
            "cpu",
            pipeline,
            admission,
            self.metrics,
            policy or RestartPolicy(),
            may_restart,
            on_retired=lambda replica: self.retired.set(),
        )

    def submit(self, prompt: str, n: int = 1, seed: int = 0) -> Ticket[GenerationRequest]:
        params = tuple(SamplingParams(seed=seed + i) for i in range(n))
        return self.admission.admit(GenerationRequest(prompt, prompt, SCHEDULE, params, time.monotonic() + 60))

    def count(self, name: str, **labels) -> float:
        value = self.metrics.owner.registry.get_sample_value(name, {"model": "m", **labels})
        assert value is not None, f"no {name} {labels}"
        return value

    def stop(self) -> None:
        self.admission.queue.close()
        self.replica.join(5)


@pytest.fixture()
def make():
    made: list[Harness] = []

    def build(*args, **kwargs) -> Harness:
        made.append(Harness(*args, **kwargs))
        return made[-1]

    yield build
    for h in made:
        h.stop()


def _error(ticket: Ticket) -> ServingError:
    with pytest.raises(ServingError) as e:
        ticket.future.result(10)
    return e.value


# ---- bisecting a failed batch -----------------------------------------------------------------
def test_a_failing_batch_is_bisected_until_only_the_failing_request_fails(make):
    pipeline = FakePipeline(poison={"p"})
    h = make(pipeline)
    tickets = {name: h.submit(name, seed=10 * i) for i, name in enumerate("apcd")}
    h.replica.start()
    assert _error(tickets["p"]).code == "generation_failed" and _error(tickets["p"]).status == 500
    assert {name: tickets[name].future.result(10).seeds for name in "acd"} == {"a": [0], "c": [20], "d": [30]}
    assert pipeline.calls == [list("apcd"), list("ap"), ["a"], ["p"], list("cd")]
    assert h.count("infinity_batch_splits_total", reason="generation") == 2
    assert h.count("infinity_errors_total", reason="generation") == 1
    assert h.count("infinity_images_generated_total") == 3
    assert h.count("infinity_running_rows") == 0
    assert h.admission.times.fastest(SCHEDULE.key) is not None  # the successful batches were timed


def test_a_request_is_never_split_between_halves(make):
    pipeline = FakePipeline(poison={"p"})
    h = make(pipeline)
    a, p, c = h.submit("a"), h.submit("p", n=3), h.submit("c")
    h.replica.start()
    assert _error(p).code == "generation_failed"
    assert a.future.result(10) and c.future.result(10)
    assert pipeline.calls == [["a", "p", "p", "p", "c"], ["a"], ["p", "p", "p", "c"], ["p", "p", "p"], ["c"]]


def test_out_of_memory_fails_the_one_request_too_big_with_503(make):
    h = make(FakePipeline(oom={"big"}))
    small, big = h.submit("small"), h.submit("big", n=4)
    h.replica.start()
    error = _error(big)
    assert (error.status, error.code) == (503, "out_of_memory") and error.retry_after
    assert small.future.result(10).seeds == [0]
    assert h.count("infinity_batch_splits_total", reason="out_of_memory") == 1
    assert h.count("infinity_errors_total", reason="out_of_memory") == 1


def test_a_request_cancelled_while_its_batch_failed_gets_cancelled_not_retried(make):
    pipeline = FakePipeline()
    h = make(pipeline)
    a, b, c = h.submit("a"), h.submit("b"), h.submit("c")

    def fail_once_as_b_leaves(requests):
        if len(pipeline.calls) == 0 and len(requests) == 3:
            b.cancel_reason = "disconnect"
            pipeline.calls.append(["<failed>"])
            raise RuntimeError("the batch failed")

    h.replica.fault_hook = fail_once_as_b_leaves
    h.replica.start()
    assert _error(b).code == "cancelled"
    assert a.future.result(10) and c.future.result(10)
    assert pipeline.calls == [["<failed>"], ["a"], ["c"]]  # the live two, retried as halves


# ---- dying, restarting, retiring --------------------------------------------------------------
def _killer(times: int):
    left = [times]

    def hook(requests):
        if left[0] > 0:
            left[0] -= 1
            raise ThreadKill()

    return hook


def test_a_dead_worker_fails_its_batch_and_is_restarted(make):
    h = make(FakePipeline())
    h.replica.fault_hook = _killer(1)
    first = h.submit("first")
    h.replica.start()
    assert _error(first).code == "generation_failed"
    assert h.submit("second").future.result(10).seeds == [0]  # served by the restarted worker
    assert h.replica.alive and not h.retired.is_set() and not h.replica.health.retired
    assert h.count("infinity_worker_deaths_total", device="cpu") == 1
    assert h.count("infinity_worker_restarts_total", device="cpu") == 1
    assert h.count("infinity_replica_up", device="cpu") == 1


def test_past_its_restart_budget_the_replica_retires(make):
    h = make(FakePipeline(), policy=RestartPolicy(restarts=1, window_s=600))
    h.replica.fault_hook = _killer(2)
    one = h.submit("one")
    h.replica.start()
    assert _error(one).code == "generation_failed"
    assert _error(h.submit("two")).code == "generation_failed"
    assert h.retired.wait(10)
    assert h.replica.health.retired and not h.replica.alive
    assert h.count("infinity_worker_deaths_total", device="cpu") == 2
    assert h.count("infinity_worker_restarts_total", device="cpu") == 1
    # infinity_replica_up is checked below: here it races the restarting thread (a bug, see there)


def test_a_replica_retired_by_its_restarted_worker_reports_down(make, monkeypatch):
    import server.replica

    h = make(FakePipeline(), policy=RestartPolicy(restarts=1, window_s=600))
    h.replica.fault_hook = _killer(2)
    restarted = threading.Event()

    class SlowRestart(threading.Thread):
        """A restart (started from a dying worker) returns only once the new worker has retired: the
        interleaving that happens by chance when the queue already holds the next batch."""

        def start(self) -> None:
            super().start()
            if threading.current_thread().name.startswith("replica-"):
                h.retired.wait(10)
                restarted.set()

    monkeypatch.setattr(server.replica.threading, "Thread", SlowRestart)
    one = h.submit("one")
    h.replica.start()
    assert _error(one).code == "generation_failed"
    assert _error(h.submit("two")).code == "generation_failed"
    assert h.retired.wait(10) and restarted.wait(10)
    assert h.count("infinity_replica_up", device="cpu") == 0


def test_while_shutting_down_a_dead_worker_is_not_restarted(make):
    h = make(FakePipeline(), may_restart=lambda: False)
    h.replica.fault_hook = _killer(1)
    ticket = h.submit("one")
    h.replica.start()
    assert _error(ticket).code == "generation_failed"
    assert h.retired.wait(10) and h.count("infinity_worker_restarts_total", device="cpu") == 0


def test_deaths_older_than_the_window_do_not_count(make):
    h = make(FakePipeline(), policy=RestartPolicy(restarts=1, window_s=0.0))  # every death is the only one
    h.replica.fault_hook = _killer(3)
    h.replica.start()
    for name in ("one", "two", "three"):
        assert _error(h.submit(name)).code == "generation_failed"
    assert h.submit("four").future.result(10)
    assert not h.retired.is_set() and h.count("infinity_worker_restarts_total", device="cpu") == 3


# ---- warm-up ----------------------------------------------------------------------------------
def test_the_warm_up_runs_each_batch_size_before_serving(make):
    pipeline = FakePipeline()
    h = make(pipeline)
    warmed = threading.Event()
    h.replica.start(Warmup(SCHEDULE, (1, 3)), warmed)
    assert warmed.wait(10) and not h.replica.health.warmup_failed
    assert h.submit("after").future.result(10)
    assert pipeline.calls == [["warm-up"], ["warm-up"] * 3, ["after"]]


def test_a_failed_warm_up_is_reported_and_still_signals(make):
    h = make(FakePipeline(poison={"warm-up"}), may_restart=lambda: False)
    warmed = threading.Event()
    h.replica.start(Warmup(SCHEDULE), warmed)
    assert warmed.wait(10) and h.retired.wait(10)
    assert h.replica.health.warmup_failed and not h.replica.alive


def test_no_warm_up_schedule_means_no_warm_up(make):
    pipeline = FakePipeline()
    h = make(pipeline)
    warmed = threading.Event()
    h.replica.start(Warmup(None), warmed)
    assert warmed.wait(10) and pipeline.calls == []
