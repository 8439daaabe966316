import random

import pytest

from instance.backend import LoadSnapshot
from orchestrator.policies.dispatch import Candidate, choose_instance, freeness


def load(free=100, running=0, waiting=0, demand=0, total=100):
    return LoadSnapshot(total_blocks=total, free_blocks=free, used_blocks=total - free, reserved_blocks=0,
                        block_size=16, num_running=running, num_waiting=waiting, num_preempted=0, num_suspended=0,
                        head_demand_blocks=demand, waiting_demand_blocks=demand, running_tokens=0,
                        step_time_ms=0.0, tokens_per_s=0.0, num_preemptions_total=0)


def test_round_robin_takes_turns_in_id_order():
    cs = [Candidate("b", load()), Candidate("a", load()), Candidate("c", load())]
    picks = [choose_instance("round-robin", cs, t, random.Random(0)) for t in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_load_counts_requests_this_frontend_already_sent():
    a = Candidate("a", load(running=2))
    b = Candidate("b", load(running=1), pending_requests=3)
    assert choose_instance("least-load", [a, b], 0, random.Random(0)) == "a"


def test_freeness_is_llumnix_formula_and_prefers_the_freest():
    busy = Candidate("busy", load(free=40, running=3, waiting=1, demand=20))
    idle = Candidate("idle", load(free=60, running=1))
    assert freeness(busy) == pytest.approx((40 - 20) / 4)
    assert freeness(idle) == 60
    assert choose_instance("freeness", [busy, idle], 0, random.Random(0)) == "idle"


def test_ties_are_broken_at_random_with_the_injected_rng():
    cs = [Candidate(i, load()) for i in "abcd"]
    picks = {choose_instance("freeness", cs, 0, random.Random(s)) for s in range(40)}
    assert picks == set("abcd")


def test_no_candidates_and_unknown_policy():
    assert choose_instance("freeness", [], 0, random.Random(0)) is None
    with pytest.raises(ValueError, match="round-robin"):
        choose_instance("fastest", [Candidate("a", load())], 0, random.Random(0))


def test_queue_length_counts_pending_requests_as_waiting_only_once_the_batch_is_full():
    idle = Candidate("a", load(running=0), pending_requests=1, batch_slots=1)
    assert idle.queue_length == 0                     # it will run at once
    full = Candidate("a", load(running=1), pending_requests=2, batch_slots=1)
    assert full.queue_length == 2
    queued = Candidate("a", load(running=0, waiting=1), pending_requests=1, batch_slots=4)
    assert queued.queue_length == 2                   # a non-empty queue means pending ones wait too
    assert Candidate("a", load(running=3), pending_requests=1).queue_length == 1   # slots unknown
