"""The batching simulator's queues, on hand-made step costs whose outcomes can be worked out by hand."""

from __future__ import annotations

import pytest

from tests.bench.batching_sim import SCHEDULERS, StepCosts, continuous, fused, simulate, static
from tests.bench.server_bench import poisson

# three scales; a step costs 1 + rows at scale 0, 2 + 2*rows at scale 1, 3 + 3*rows at scale 2; decode 0.5
LINEAR = StepCosts((1, 2, 4), ((2.0, 3.0, 5.0), (4.0, 6.0, 10.0), (6.0, 9.0, 15.0)), 0.5)


def test_step_costs_interpolate_between_and_extrapolate_past_the_measured_rows():
    assert LINEAR.step(0, 3) == 4.0
    assert LINEAR.step(2, 8) == 27.0  # 3 + 3*8, from the last two measured
    assert LINEAR.overhead == 1.0  # scale 0's line at zero rows
    assert LINEAR.lone() == 12.5


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_lone_request_takes_its_steps_and_its_decode(name):
    assert SCHEDULERS[name](LINEAR, [5.0], 8) == [12.5]


def test_static_batches_what_waits_and_decodes_one_image_after_the_other():
    assert static(LINEAR, [0.0, 0.0], 8) == [18.5, 19.0]  # 3 + 6 + 9, then a decode each
    # one request per batch: the second and third wait for the ones before them
    assert static(LINEAR, [0.0, 0.0, 0.0], 1) == [12.5, 25.0, 37.5]
    # arrivals during a batch form the next one, in order
    assert static(LINEAR, [0.0, 1.0, 2.0], 8) == [12.5, 30.0, 29.5]


def test_under_load_the_static_batcher_waits_up_to_max_wait_for_a_fuller_batch():
    # After a batch of two, the next head (at 20) waits until 23 for company: the request at 21 joins.
    assert static(LINEAR, [0.0, 0.0, 20.0, 21.0], 8, max_wait=3.0) == [18.5, 19.0, 21.5, 21.0]
    # Without the wait each goes alone; a lone request never waits (the batch before it held one).
    assert static(LINEAR, [0.0, 0.0, 20.0, 21.0], 8, max_wait=0.0) == [18.5, 19.0, 12.5, 24.0]


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_starting_a_batch_costs_its_text_encoding_once(name):
    costs = StepCosts(LINEAR.rows, LINEAR.scales, LINEAR.decode, start=(1.0, 1.5, 2.5))
    assert SCHEDULERS[name](costs, [0.0], 8) == [13.5]
    assert SCHEDULERS[name](costs, [0.0, 0.0], 8) == [1.5 + 18.5, 1.5 + 19.0]  # one start for both


def test_continuous_admits_at_the_next_boundary_and_merges_after_the_catch_up():
    # The second request arrives during the first's scale 0 (done at 2): it starts at 2 alone, the first
    # waits (catch-up 2 <= 2 * (4 + 6)), both are at scale 1 at 4 and run merged: 4 + 6 + 9 = 19, decodes.
    assert continuous(LINEAR, [0.0, 1.0], 8) == [19.5, 19.0]


def test_fused_pays_the_fixed_step_cost_once_for_rows_at_different_scales():
    # The second request (at scale 0) steps with the first (at scale 1): 1 + (2-1) + (4-1) = 5 at once.
    # Then scales 1 and 2: 1 + (4-1) + (6-1) = 9; then scale 2 alone: 6, and the two decodes.
    assert fused(LINEAR, [0.0, 1.0], 8) == [2.0 + 5.0 + 9.0 + 0.5, 2.0 + 5.0 + 9.0 + 6.0 + 0.5 + 0.5 - 1.0]


def test_where_steps_are_overhead_the_fused_ideal_beats_the_static_batcher():
    # a step costs 10 whatever its rows up to 2, then 1 per row: nearly all fixed cost
    costs = StepCosts((1, 2, 4), ((10.0, 10.0, 12.0),) * 3, 0.1)
    rate = 0.7 / costs.batch(1)  # 70% of what one request at a time sustains
    ideal, batched = simulate(fused, costs, rate, 400, 2, 8), simulate(static, costs, rate, 400, 2, 8)
    assert ideal.p50 < batched.p50 and ideal.p95 < 0.8 * batched.p95


def test_arrivals_are_answered_in_full_under_every_scheduler():
    arrivals = poisson(0.1, 200, seed=3)
    for scheduler in SCHEDULERS.values():
        latencies = scheduler(LINEAR, arrivals, 4)
        assert len(latencies) == 200 and min(latencies) >= LINEAR.lone() - 1e-9
