import math
import random
from collections import Counter

import pytest

from instance.backend import LoadSnapshot
from orchestrator.policies.dispatch import Candidate, choose_instance, freeness, virtual_usage


def load(free=100, running=0, waiting=0, demand=0, total=100, high=0, reserved=0, rest=0, remaining=0):
    """`demand`: blocks the head of the queue needs; `rest`: what the other waiting requests need."""
    return LoadSnapshot(total_blocks=total, free_blocks=free, used_blocks=total - free - reserved,
                        reserved_blocks=reserved, block_size=16, num_running=running, num_waiting=waiting,
                        num_preempted=0, num_suspended=0, head_demand_blocks=demand,
                        waiting_demand_blocks=demand + rest, running_tokens=0, step_time_ms=0.0,
                        tokens_per_s=0.0, num_preemptions_total=0, num_high_priority=high,
                        remaining_output_tokens=remaining)


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


def test_virtual_usage_counts_blocks_held_and_reserved_the_queue_head_and_high_priority_headroom():
    ld = load(free=50, reserved=10, running=3, waiting=2, demand=8, rest=30, high=1)
    # 40 used + 10 reserved, + the head's 8 (not the 30 of the requests behind it), + 0.25 x 100 for one
    assert virtual_usage(ld, high_priority_headroom=0.25) == 50 + 8 + 25
    assert virtual_usage(ld, pending_blocks=5, high_priority_headroom=0.0) == 50 + 8 + 5
    assert virtual_usage(load(free=80, demand=8), high_priority_headroom=0.25) == 20   # no queue: no head demand
    assert virtual_usage(ld, draining=True) == math.inf
    # freeness = (capacity - virtual usage) / (running + waiting + pending)
    assert freeness(Candidate("a", ld), high_priority_headroom=0.25) == pytest.approx((100 - 83) / 5)
    assert freeness(Candidate("a", ld, draining=True)) == -math.inf


def test_headroom_of_a_high_priority_request_sends_normal_work_to_the_other_instance():
    serving_high = Candidate("h", load(free=70, running=2, high=1))
    normal = Candidate("n", load(free=60, running=2))
    assert choose_instance("freeness", [serving_high, normal], 0, random.Random(0),
                           high_priority_headroom=0.2) == "n"
    assert choose_instance("freeness", [serving_high, normal], 0, random.Random(0),
                           high_priority_headroom=0.0) == "h"


def test_top_k_picks_at_random_among_the_k_freest_only():
    cs = [Candidate(i, load(free=f, running=1)) for i, f in zip("abcd", (90, 80, 20, 10))]
    assert {choose_instance("freeness", cs, 0, random.Random(s)) for s in range(30)} == {"a"}
    picks = Counter(choose_instance("freeness", cs, 0, random.Random(s), top_k=2) for s in range(60))
    assert set(picks) == {"a", "b"}
    assert set(choose_instance("least-load", cs, 0, random.Random(s), top_k=3) for s in range(60)) == set("abcd")
    with pytest.raises(ValueError, match="top_k"):
        choose_instance("freeness", cs, 0, random.Random(0), top_k=0)


def test_a_draining_instance_gets_nothing_while_another_is_open():
    idle_draining = Candidate("a", load(), draining=True)
    busy = Candidate("b", load(free=5, running=9, waiting=4, demand=5))
    for policy in ("round-robin", "least-load", "freeness"):
        assert {choose_instance(policy, [idle_draining, busy], t, random.Random(t)) for t in range(4)} == {"b"}
    assert choose_instance("freeness", [idle_draining], 0, random.Random(0)) == "a"   # the caller decides


def test_dispatch_counts_the_whole_queue_a_new_request_would_wait_behind():
    long_queue = Candidate("q", load(free=60, running=1, waiting=2, demand=4, rest=40))
    no_queue = Candidate("n", load(free=40, running=3))
    # with the head's demand only q looks freer: (100 - 40 - 4) / 3 = 18.7 against 40 / 3 = 13.3 ...
    assert freeness(long_queue) > freeness(no_queue)
    # ... but a new request would wait behind all 44 blocks: (100 - 40 - 44) / 3 = 5.3
    assert freeness(long_queue, whole_queue=True) == pytest.approx(16 / 3)
    assert choose_instance("freeness", [long_queue, no_queue], 0, random.Random(0)) == "n"


def test_an_overcommitted_instance_looks_less_free_the_more_requests_it_has():
    # both promise 10 blocks more than they have; divided by the batch, the longer queue would look freer
    short = Candidate("short", load(free=0, running=2, waiting=1, demand=10))
    long_ = Candidate("long", load(free=0, running=2, waiting=8, demand=10))
    assert freeness(short) == -30 and freeness(long_) == -100
    assert choose_instance("freeness", [short, long_], 0, random.Random(0)) == "short"


def test_expected_output_counts_the_blocks_running_requests_will_still_grow_into():
    # same blocks and batch now; `long` has just started 2 x 400-token generations, `short` is nearly done
    long = Candidate("long", load(free=60, running=2, remaining=800))
    short = Candidate("short", load(free=58, running=2, remaining=32))
    assert choose_instance("freeness", [long, short], 0, random.Random(0)) == "long"     # 60 > 58 free blocks
    assert choose_instance("freeness", [long, short], 0, random.Random(0), output_weight=1.0) == "short"
    assert virtual_usage(long.load, output_weight=0.5) == pytest.approx(40 + 0.5 * 800 / 16)
