"""Prefill/decode disaggregation policies on hand-made snapshots (no Ray)."""

import pytest

from instance.backend import LoadSnapshot, RequestInfo
from orchestrator.policies.migration import InstanceState
from orchestrator.policies.pd import (AdaptiveConfig, HandoffConfig, adapt_roles, check_role, plan_handoffs,
                                      plan_prompt_returns, takes_decodes, takes_prompts)

BS = 16


def req(rid, prompt=64, out=0, status="running", computed=None, max_tokens=128):
    if computed is None:
        computed = 0 if status == "waiting" else prompt + max(0, out - 1)
    return RequestInfo(request_id=rid, status=status, num_tokens=prompt + out, num_prompt_tokens=prompt,
                       num_output_tokens=out, max_tokens=max_tokens, num_computed_tokens=computed, priority=0,
                       num_preemptions=0)


def inst(iid, free, *reqs, total=100, out=0, in_=0, step_ms=0.0, preempted=0, accepting=True):
    waiting = [r for r in reqs if r.status == "waiting"]
    load = LoadSnapshot(total_blocks=total, free_blocks=free, used_blocks=total - free, reserved_blocks=0,
                        block_size=BS, num_running=sum(r.status == "running" for r in reqs),
                        num_waiting=len(waiting), num_preempted=preempted, num_suspended=0,
                        head_demand_blocks=-(-waiting[0].num_tokens // BS) if waiting else 0,
                        waiting_demand_blocks=sum(-(-r.num_tokens // BS) for r in waiting),
                        running_tokens=0, step_time_ms=step_ms, tokens_per_s=0.0, num_preemptions_total=0)
    return InstanceState(iid, load, tuple(reqs), accepting=accepting, migrations_out=out, migrations_in=in_)


def moves(ms):
    return [(m.request_id, m.src, m.dst) for m in ms]


def test_new_requests_go_to_prefill_and_both_instances_or_anywhere_if_there_are_none():
    roles = {"p": "prefill", "d": "decode", "b": "both"}
    assert takes_prompts(roles, ["p", "d", "b"]) == ["p", "b"]
    assert takes_prompts(roles, ["d"]) == ["d"]                 # every prefill instance is gone
    assert takes_decodes(roles, ["p", "d", "b"]) == ["d", "b"]
    assert takes_decodes(roles, ["p"]) == []                    # nowhere to hand over: it decodes where it is
    assert takes_prompts({}, ["x"]) == ["x"]                    # no role recorded means both


def test_unknown_role_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="prefill, decode"):
        check_role("decoder")
    assert check_role("decode") == "decode"


def test_every_running_request_of_a_prefill_instance_goes_to_the_freest_decode_instance():
    p = inst("p", 50, req("a", 64), req("b", 64, out=1), req("w", 64, status="waiting"))
    d0, d1 = inst("d0", 20, req("x", 64, out=9)), inst("d1", 80, req("y", 64, out=9))
    got = moves(plan_handoffs([p], [d0, d1], set(), HandoffConfig()))
    # the waiting one is not admitted yet; the picks are counted against d1 until d0 is freer
    assert got == [("a", "p", "d1"), ("b", "p", "d1")]


def test_picks_spread_once_the_freest_decode_instance_fills_up():
    p = inst("p", 50, *[req(f"r{i}", 320) for i in range(4)])          # 21 blocks each after the first token
    d0, d1 = inst("d0", 60), inst("d1", 50)
    got = moves(plan_handoffs([p], [d0, d1], set(), HandoffConfig(headroom_blocks=4)))
    # d0: 60 -> 39 -> 18; d1: 50 -> 29 -> 8: a third pick on either would break the headroom
    assert got == [("r0", "p", "d0"), ("r1", "p", "d1"), ("r2", "p", "d0"), ("r3", "p", "d1")]


def test_no_room_on_any_decode_instance_leaves_the_request_decoding_where_it_is():
    p = inst("p", 50, req("a", 640, out=3))
    full = inst("d", 30, req("x", 64, out=9))
    assert plan_handoffs([p], [full], set(), HandoffConfig()) == []
    assert plan_handoffs([p], [], set(), HandoffConfig()) == []


def test_hand_overs_respect_in_flight_limits_and_skip_moving_requests():
    p = inst("p", 50, req("a"), req("b"), req("c"), out=1)
    d = inst("d", 90, in_=0)
    cfg = HandoffConfig(max_per_source=2, max_per_destination=4)
    # the status shows one out, the scheduler knows of "a": that is the same one, so one more may go
    assert moves(plan_handoffs([p], [d], {"a"}, cfg)) == [("b", "p", "d")]
    assert moves(plan_handoffs([p], [d], {"a", "b"}, cfg)) == []
    assert moves(plan_handoffs([p], [d], set(), cfg)) == [("a", "p", "d")]
    busy_dst = inst("d", 90, in_=4)
    assert plan_handoffs([inst("p", 50, req("a"))], [busy_dst], set(), cfg) == []


def test_a_full_batch_on_the_decode_instance_takes_no_more():
    p = inst("p", 50, req("a"))
    d = inst("d", 90, req("x", out=3), req("y", out=3))
    assert plan_handoffs([p], [d], set(), HandoffConfig(batch_slots=2)) == []
    assert moves(plan_handoffs([p], [d], set(), HandoffConfig(batch_slots=3))) == [("a", "p", "d")]


def test_queued_prompts_leave_a_decode_instance_for_the_prefill_instance_with_most_room():
    d = inst("d", 40, req("run", out=5), req("q1", 64, status="waiting"),
             req("pre", 64, out=4, status="waiting", computed=0))   # preempted: it has output, it stays
    p0, p1 = inst("p0", 30), inst("p1", 60)
    assert moves(plan_prompt_returns([d], [p0, p1], set())) == [("q1", "d", "p1")]
    assert plan_prompt_returns([d], [p0, p1], {"q1"}) == []


def test_adaptive_roles_move_a_decode_instance_to_prefill_when_prompts_queue():
    roles = {"p": "prefill", "d0": "decode", "d1": "decode"}
    queued = inst("p", 10, req("a"), *[req(f"w{i}", status="waiting") for i in range(3)])
    d0, d1 = inst("d0", 90, req("x", out=3)), inst("d1", 95)
    change = adapt_roles([queued, d0, d1], roles, AdaptiveConfig(queue_high=2), now=100, last_change_at=0)
    assert (change.instance_id, change.role) == ("d1", "prefill") and "prefill is the bottleneck" in change.reason
    # cooling down: no change
    assert adapt_roles([queued, d0, d1], roles, AdaptiveConfig(cooldown_s=10), now=100, last_change_at=95) is None
    # the last decode instance is never taken
    assert adapt_roles([queued, d0], {"p": "prefill", "d0": "decode"}, AdaptiveConfig(), 100, 0) is None


def test_adaptive_roles_move_a_prefill_instance_to_decode_when_decoding_is_squeezed():
    roles = {"p0": "prefill", "p1": "prefill", "d": "decode"}
    p0, p1 = inst("p0", 90, req("a")), inst("p1", 95)
    squeezed = inst("d", 6, req("x", out=30), req("y", out=30), preempted=1)
    change = adapt_roles([p0, p1, squeezed], roles, AdaptiveConfig(), 100, 0)
    assert (change.instance_id, change.role) == ("p1", "decode") and "decode is the bottleneck" in change.reason
    slow = inst("d", 90, req("x", out=30), step_ms=300)
    assert adapt_roles([p0, p1, slow], roles, AdaptiveConfig(tpot_target_ms=200), 100, 0).role == "decode"
    assert adapt_roles([p0, p1, slow], roles, AdaptiveConfig(), 100, 0) is None      # no TPOT target set
    # both sides hot: moving either makes the other worse, so nothing moves
    hot_p = inst("p0", 10, *[req(f"w{i}", status="waiting") for i in range(4)])
    assert adapt_roles([hot_p, p1, squeezed], roles, AdaptiveConfig(), 100, 0) is None
