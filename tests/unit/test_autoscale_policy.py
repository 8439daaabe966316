"""The autoscaling policy: delays, bounds, one change at a time, cooldown, no flapping, which instance goes."""

import pytest

from instance.backend import LoadSnapshot
from orchestrator.policies.autoscale import (AutoscaleConfig, AutoscaleMemory, average_freeness, choose_victim,
                                             plan_scaling)
from orchestrator.policies.migration import InstanceState

CFG = AutoscaleConfig(enabled=True, low_freeness=10, high_freeness=60, scale_up_delay_s=30, scale_down_delay_s=600,
                      cooldown_s=60, min_instances=1, max_instances=4)


def inst(iid: str, used: int, running: int, total: int = 100, accepting: bool = True, high: int = 0):
    load = LoadSnapshot(total_blocks=total, free_blocks=total - used, used_blocks=used, reserved_blocks=0,
                        block_size=16, num_running=running, num_waiting=0, num_preempted=0, num_suspended=0,
                        head_demand_blocks=0, waiting_demand_blocks=0, running_tokens=0, step_time_ms=0.0,
                        tokens_per_s=0.0, num_preemptions_total=0, num_high_priority=high)
    return InstanceState(iid, load, (), accepting=accepting)


BUSY = [inst("a", 95, 10), inst("b", 92, 8)]           # freeness 0.5 and 1.0
IDLE = [inst("a", 0, 0), inst("b", 10, 1)]             # freeness 100 and 90
MIDDLE = [inst("a", 60, 2), inst("b", 50, 2)]          # freeness 20 and 25


def run(samples, current=2, cfg=CFG, memory=AutoscaleMemory(), in_flight=False, roles=None):
    """Feed (time, states) samples; the decisions made, with the time of each."""
    decisions = []
    for now, states in samples:
        decision, memory = plan_scaling(states, roles or {}, current, in_flight, cfg, now, memory)
        if decision is not None:
            decisions.append((now, decision))
            current = decision.target
    return decisions, memory


def test_the_average_is_of_normal_priority_freeness_over_accepting_instances():
    assert average_freeness(BUSY) == pytest.approx((5 / 10 + 8 / 8) / 2)
    assert average_freeness([inst("a", 0, 0, high=1), inst("d", 99, 1, accepting=False)]) == 100.0


def test_it_scales_out_only_after_the_load_stayed_high_for_the_delay():
    decisions, _ = run([(t, BUSY) for t in range(0, 31, 5)])
    assert [(t, d.target) for t, d in decisions] == [(30, 3)]
    assert "average freeness 0.8 < 10" in decisions[0][1].reason


def test_it_scales_in_the_least_busy_instance_only_after_the_long_delay():
    decisions, _ = run([(t, IDLE) for t in range(0, 601, 60)])
    assert [(t, d.target, d.remove) for t, d in decisions] == [(600, 1, "a")]


def test_a_load_that_oscillates_inside_or_across_the_band_never_flaps():
    samples = [(t, BUSY if (t // 10) % 2 else MIDDLE) for t in range(0, 2000, 5)]
    assert run(samples)[0] == []                        # below the mark 10 s at a time: never 30 s in a row
    samples = [(t, IDLE if (t // 300) % 2 else MIDDLE) for t in range(0, 3000, 5)]
    assert run(samples)[0] == []                        # above for 300 s at a time, never 600


def test_bounds_cooldown_and_one_change_at_a_time():
    at_max = [(t, BUSY) for t in range(0, 200, 5)]
    assert run(at_max, current=4)[0] == []                                   # max_instances
    assert run([(t, IDLE) for t in range(0, 1300, 60)], current=1)[0] == []  # min_instances
    decisions, memory = run([(t, BUSY) for t in range(0, 200, 5)], current=2)
    assert [(t, d.target) for t, d in decisions] == [(30, 3), (90, 4)]      # 30 s delay, then 60 s cooldown
    assert run([(t, BUSY) for t in range(0, 200, 5)], in_flight=True)[0] == []
    decisions, _ = run([(0, MIDDLE)], current=0)
    assert decisions[0][1].target == 1 and "below min_instances" in decisions[0][1].reason
    decisions, _ = run([(0, MIDDLE)], current=6)
    assert decisions[0][1].target == 5 and decisions[0][1].remove is not None


def test_the_victim_has_the_fewest_running_requests_and_is_never_the_last_of_a_pd_role():
    states = [inst("p", 0, 0), inst("d0", 10, 1), inst("d1", 20, 1), inst("b", 5, 3)]
    roles = {"p": "prefill", "d0": "decode", "d1": "decode", "b": "both"}
    assert choose_victim(states, roles).instance_id == "d0"        # p is the last prefill; d0 ties d1 on running
    assert choose_victim(states[:2], {"p": "prefill", "d0": "decode"}) is None


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="low_freeness"):
        AutoscaleConfig(low_freeness=50, high_freeness=40)
    with pytest.raises(ValueError, match="min_instances"):
        AutoscaleConfig(min_instances=5, max_instances=2)
