from collections import Counter

import pytest

from instance.backend import LoadSnapshot, RequestInfo
from orchestrator.policies.migration import (InstanceState, MigrationPolicyConfig, choose_request, plan_drain,
                                             plan_migrations)

BS = 16


def req(rid, tokens=32, status="running", out=8, max_tokens=256, computed=None, priority=0, preemptions=0):
    if computed is None:
        computed = 0 if status == "waiting" else tokens - 1
    return RequestInfo(request_id=rid, status=status, num_tokens=tokens, num_prompt_tokens=tokens - out,
                       num_output_tokens=out, max_tokens=max_tokens, num_computed_tokens=computed,
                       priority=priority, num_preemptions=preemptions)


def inst(iid, free, *reqs, total=100, accepting=True, out=0, in_=0, draining=False, head_wait=0.0):
    """An instance whose load agrees with its requests: counts and waiting demand come from `reqs`."""
    waiting = [r for r in reqs if r.status == "waiting"]
    load = LoadSnapshot(total_blocks=total, free_blocks=free, used_blocks=total - free, reserved_blocks=0,
                        block_size=BS, num_running=sum(r.status == "running" for r in reqs),
                        num_waiting=len(waiting), num_preempted=sum(r.num_preemptions > 0 for r in waiting),
                        num_suspended=sum(r.status == "suspended" for r in reqs),
                        head_demand_blocks=-(-waiting[0].num_tokens // BS) if waiting else 0,
                        waiting_demand_blocks=sum(-(-r.num_tokens // BS) for r in waiting),
                        running_tokens=0, step_time_ms=0.0, tokens_per_s=0.0, num_preemptions_total=0,
                        num_high_priority=sum(r.priority > 0 and r.status != "suspended" for r in reqs),
                        head_wait_s=head_wait if waiting else 0.0)
    return InstanceState(iid, load, tuple(reqs), accepting=accepting, migrations_out=out, migrations_in=in_,
                         draining=draining)


def plan(instances, cfg=MigrationPolicyConfig(), now=100.0, last=None):
    return [(m.request_id, m.src, m.dst) for m in plan_migrations(instances, cfg, now, last or {})]


def overloaded(iid="instance-0"):
    # freeness 10 / 4 = 2.5
    return inst(iid, 10, req("r100", 100), req("r37", 37), req("r80", 80), req("r60", 60))


def test_balanced_cluster_moves_nothing():
    a = inst("a", 50, req("a1"), req("a2"))
    b = inst("b", 60, req("b1"), req("b2"))
    assert plan([a, b]) == []


def test_overloaded_gives_its_shortest_requests_to_the_idle_one_until_it_is_no_longer_a_source():
    moves = plan_migrations([overloaded(), inst("instance-1", 100)], MigrationPolicyConfig(max_moves=5), 0.0, {})
    # after two moves instance-0 has 17 free blocks for 2 requests (8.5 >= 8) and stops giving
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("r37", "instance-0", "instance-1"),
                                                             ("r60", "instance-0", "instance-1")]
    assert moves[0].reason == "instance-0 freeness 2.5 < 8 -> instance-1 freeness 100.0; shortest request (37 tokens)"


def test_waiting_or_preempted_requests_make_an_instance_a_source_even_with_decent_freeness():
    a = inst("a", 60, req("a1"), req("a2", 48), req("w", 32, status="waiting"))   # freeness (60 - 2) / 3 = 19.3
    moves = plan_migrations([a, inst("b", 100)], MigrationPolicyConfig(max_moves=1), 0.0, {})
    assert [(m.request_id, m.dst) for m in moves] == [("w", "b")]
    assert moves[0].reason.startswith("a has 1 waiting (freeness 19.3) -> b")
    assert moves[0].reason.endswith("waiting request (32 tokens, not started: no KV to copy)")
    p = inst("p", 60, req("p1"), req("w", 32, status="waiting", preemptions=1))
    assert "1 waiting, 1 preempted" in plan_migrations([p, inst("b", 100)], MigrationPolicyConfig(), 0.0, {})[0].reason


def test_a_queued_source_gives_its_head_first_and_a_running_request_when_no_waiting_one_fits():
    # queue order: priority first, then arrival; a waiting request needs room for its whole prompt
    a = inst("a", 4, req("r1", 200), req("w-big", 1600, status="waiting"), req("w-small", 64, status="waiting"),
             req("w-high", 400, status="waiting", priority=1))
    cfg = MigrationPolicyConfig(max_moves=1)
    assert plan([a, inst("b", 100)], cfg) == [("w-high", "a", "b")]       # the head: high priority goes first
    assert plan([a, inst("b", 26)], cfg) == [("w-small", "a", "b")]       # 25 + 4 blocks do not fit in 26; 4 + 4 do
    only_big = inst("a", 4, req("r1", 200), req("w-big", 1600, status="waiting"))
    assert plan([only_big, inst("b", 100)], cfg) == [("r1", "a", "b")]    # 100 blocks fit nowhere: a running one
    assert plan([a, inst("b", 100)], MigrationPolicyConfig(max_moves=1, max_waiting_offers=0)) == [("r1", "a", "b")]


def test_an_instance_with_waiting_requests_is_not_a_destination():
    busy_but_free = inst("b", 90, req("w", status="waiting"))
    assert plan([overloaded("a"), busy_but_free]) == []


def test_requests_about_to_finish_or_not_yet_computed_stay():
    ending = req("ending", 20, out=250, max_tokens=256)          # 6 tokens left < 16
    fresh = req("fresh", 30, computed=0)                         # running but its prefill has not run
    a = inst("a", 2, ending, fresh)
    assert plan([a, inst("b", 100)]) == []
    a = inst("a", 2, ending, fresh, req("long", 200))
    assert plan([a, inst("b", 100)], MigrationPolicyConfig(max_moves=1)) == [("long", "a", "b")]


@pytest.mark.parametrize("choose, expected", [("shortest", "b"), ("longest", "c"), ("lowest-priority", "b"),
                                              ("newest", "a")])
def test_each_choice_picks_what_it_says(choose, expected):
    # arrival order b, c, d, a
    reqs = (req("b", 20), req("c", 90), req("d", 70), req("a", 50))
    assert choose_request(reqs, MigrationPolicyConfig(choose=choose), BS).request_id == expected
    assert plan([inst("src", 2, *reqs), inst("dst", 100)], MigrationPolicyConfig(choose=choose, max_moves=1)) \
        == [(expected, "src", "dst")]


@pytest.mark.parametrize("choose, expected", [("shortest", "d"), ("longest", "c"), ("lowest-priority", "d"),
                                              ("newest", "d")])
def test_the_lowest_priority_requests_move_first_whatever_the_choice(choose, expected):
    reqs = (req("b", 20, priority=1), req("c", 90, priority=0), req("d", 70, priority=0), req("a", 50, priority=1))
    assert choose_request(reqs, MigrationPolicyConfig(choose=choose), BS).request_id == expected


def test_ties_go_to_the_smallest_request_id():
    reqs = (req("y", 40), req("x", 40), req("z", 40))
    assert choose_request(reqs, MigrationPolicyConfig(), BS).request_id == "x"
    assert choose_request(reqs, MigrationPolicyConfig(choose="longest"), BS).request_id == "x"


def test_cooldown_rate_limits_both_source_and_destination():
    cluster = [overloaded("a"), inst("b", 100)]
    cfg = MigrationPolicyConfig(max_moves=1, cooldown_s=1.0)
    assert plan(cluster, cfg, now=10.5, last={"a": 10.0}) == []
    assert plan(cluster, cfg, now=10.5, last={"b": 10.0}) == []
    assert plan(cluster, cfg, now=11.0, last={"a": 10.0, "b": 10.0}) == [("r37", "a", "b")]


def test_a_non_accepting_instance_is_never_a_destination():
    closed = inst("b", 100, accepting=False)
    assert plan([overloaded("a"), closed]) == []
    open_ = inst("c", 60, req("c1"))    # freeness 60, less free than b but accepting
    assert {dst for _, _, dst in plan([overloaded("a"), closed, open_])} == {"c"}


def test_instances_with_a_migration_in_flight_sit_the_round_out():
    assert plan([inst("a", 10, *overloaded().requests, out=1), inst("b", 100)]) == []
    assert plan([overloaded("a"), inst("b", 100, in_=1)]) == []


def test_max_moves_and_a_second_move_goes_elsewhere_once_the_first_destination_is_no_longer_free():
    a = inst("a", 0, *(req(f"r{i}") for i in range(6)))          # 2 blocks each, freeness 0
    b = inst("b", 50, req("b1"))                                 # freeness 50; after one more: 48 / 2 = 24
    c = inst("c", 40, req("c1"))                                 # freeness 40
    assert plan([a, b, c], MigrationPolicyConfig(max_moves=1)) == [("r0", "a", "b")]
    moves = plan([a, b, c], MigrationPolicyConfig(max_moves=2))
    assert moves == [("r0", "a", "b"), ("r1", "a", "c")]
    assert plan([c, b, a], MigrationPolicyConfig(max_moves=2)) == moves     # input order does not matter
    # c drops to 38 / 2 = 19 after one: neither takes a third, however many moves a round allows
    assert plan([a, b, c], MigrationPolicyConfig(max_moves=5)) == moves


def test_a_destination_keeps_its_headroom():
    a = inst("a", 0, req("big", 400))                            # 25 blocks
    b = inst("b", 28, total=28)                                  # freeness 28 but 28 - 25 < 4
    assert plan([a, b]) == []
    assert plan([a, b], MigrationPolicyConfig(headroom_blocks=3)) == [("big", "a", "b")]


def draining():
    running = [req(f"r{i}", 32) for i in range(7)] + [req("ending", 32, out=250, max_tokens=256)]
    waiting = [req(f"w{i}", 48, status="waiting") for i in range(4)]
    return inst("d", 0, *running, *waiting, req("s", 32, status="suspended"), accepting=False)


def test_drain_spreads_running_and_waiting_requests_over_the_destinations():
    others = [inst("x", 40), inst("y", 40), inst("z", 100, accepting=False)]
    moves, stuck = plan_drain(draining(), others, MigrationPolicyConfig())
    assert stuck == []
    assert sorted(m.request_id for m in moves) == sorted([f"r{i}" for i in range(7)] + ["ending"]
                                                        + [f"w{i}" for i in range(4)])   # not the suspended one
    assert Counter(m.dst for m in moves) == {"x": 6, "y": 6}
    assert all(m.src == "d" and m.reason.startswith("drain d -> ") for m in moves)


def test_drain_reports_what_cannot_move_and_why():
    moves, stuck = plan_drain(draining(), [inst("x", 10)], MigrationPolicyConfig())
    assert len(moves) == 3                                       # 2 blocks each: 10 -> 8 -> 6 -> 4 (headroom)
    assert len(stuck) == 9 and all("no instance has room" in why for _, why in stuck)
    _, stuck = plan_drain(draining(), [inst("x", 100, accepting=False)], MigrationPolicyConfig())
    assert len(stuck) == 12 and {why for _, why in stuck} == {"no accepting instance to take it"}


def test_bad_config_gets_a_sentence_naming_the_choices():
    with pytest.raises(ValueError, match="shortest, longest, lowest-priority, newest"):
        MigrationPolicyConfig(choose="random")
    with pytest.raises(ValueError, match="source_freeness"):
        MigrationPolicyConfig(source_freeness=30.0)


def test_normal_requests_move_away_from_an_instance_serving_a_high_priority_one():
    cfg = MigrationPolicyConfig(high_priority_headroom=0.4, max_moves=1)
    high = req("vip", 40, priority=1)
    shared = inst("a", 50, high, req("n1", 40), req("n2", 200))        # 50 / 3 = 16.7 > 8 without headroom
    assert plan([shared, inst("b", 100)], MigrationPolicyConfig(high_priority_headroom=0.0)) == []
    # with headroom: (50 - 40) / 3 = 3.3 < 8: a normal request leaves (the shortest), not the high-priority one
    moves = plan_migrations([shared, inst("b", 100)], cfg, 0.0, {})
    assert [(m.request_id, m.dst) for m in moves] == [("n1", "b")]
    assert "headroom for 1 high-priority" in moves[0].reason
    # an instance loaded only by the headroom of its high-priority requests keeps them where they are
    only_high = inst("a", 80, high, req("vip2", 100, priority=2))    # (80 - 80) / 2 = 0, but 80 / 2 without
    assert plan([only_high, inst("b", 100)], cfg) == []


def test_normal_work_does_not_move_onto_an_instance_serving_high_priority_requests():
    cfg = MigrationPolicyConfig(high_priority_headroom=0.25, max_moves=1)
    with_high = inst("h", 70, req("vip", 32, priority=1), req("h2"))  # (70 - 25) / 2 = 22.5 < 24; 35 without
    plain = inst("p", 60, req("x1"), req("x2"))                        # 60 / 2 = 30
    assert plan([overloaded("a"), with_high, plain], cfg) == [("r37", "a", "p")]
    assert plan([overloaded("a"), with_high, plain], MigrationPolicyConfig(high_priority_headroom=0.0,
                                                                           max_moves=1)) == [("r37", "a", "h")]


def test_a_really_loaded_instance_gives_high_priority_requests_too_once_no_normal_one_can_move():
    a = inst("a", 2, req("vip", 64, priority=1), req("ending", 20, out=250, max_tokens=256))
    assert plan([a, inst("b", 100)], MigrationPolicyConfig(max_moves=1)) == [("vip", "a", "b")]


def test_a_draining_instance_gives_its_requests_every_round_and_takes_none():
    cfg = MigrationPolicyConfig(max_moves=3)
    d = inst("d", 90, req("d1"), req("d2", 48), accepting=True, draining=True)   # freeness 45 but infinite usage
    moves = plan_migrations([d, inst("b", 100)], cfg, now=10.1, last_move_at={"d": 10.0})
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("d1", "d", "b"), ("d2", "d", "b")]   # cooldown or not
    assert moves[0].reason.startswith("d drains -> b")
    assert plan([overloaded("a"), inst("d", 100, draining=True)]) == []


def test_a_request_that_just_moved_stays_put_for_the_request_cooldown():
    cfg = MigrationPolicyConfig(max_moves=1, request_cooldown_s=10.0)
    instances = [overloaded("a"), inst("b", 100)]
    assert plan(instances, cfg, now=100.0, last={}) == [("r37", "a", "b")]
    moved = {"r37": 95.0}                                 # it came to `a` 5 s ago: the next shortest goes
    assert [m.request_id for m in plan_migrations(instances, cfg, 100.0, {}, moved)] == ["r60"]
    assert [m.request_id for m in plan_migrations(instances, cfg, 106.0, {}, moved)] == ["r37"]   # 11 s later
    settled = {r: 99.0 for r in ("r37", "r60", "r80", "r100")}
    assert plan_migrations(instances, cfg, 100.0, {}, settled) == []
    draining = inst("a", 10, req("r37", 37), draining=True)   # a drain moves it anyway
    assert [m.request_id for m in plan_migrations([draining, inst("b", 100)], cfg, 100.0, {}, settled)] == ["r37"]


def fragmented():
    """Two instances with 40 free blocks each: a 56-block prompt queued on `a` fits on neither, though the two
    together have room; neither is free enough (freeness 20 < 24) to be an ordinary destination."""
    a = inst("a", 40, req("a-big", 640), req("a-small", 320), req("w", 896, status="waiting"))
    b = inst("b", 40, req("b1", 480), req("b2", 480))
    return [a, b]


def test_defrag_makes_room_for_a_queue_head_that_fits_nowhere():
    assert plan(fragmented()) == []                                       # ordinary rebalancing finds nothing
    moves = plan_migrations(fragmented(), MigrationPolicyConfig(defrag=True), 100.0, {})
    # a's largest running request (40 blocks) does not fit on b (40 - 40 < 4 headroom); its 20-block one does,
    # and then a has 60 free blocks for the 56-block head and one block for its one running request to grow into
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("a-small", "a", "b")]
    assert moves[0].reason.startswith("defrag: making room for a 56-block prompt on a")


def test_defrag_does_nothing_when_the_head_fits_somewhere_or_no_room_can_be_made():
    a, b = fragmented()
    roomy = inst("b", 70, req("b1", 480))                                 # the head fits on b: ordinary moves
    assert [m.request_id for m in plan_migrations([a, roomy], MigrationPolicyConfig(defrag=True), 100.0, {})] \
        == ["w"]
    full = inst("b", 10, req("b1", 480), req("b2", 480))                  # nowhere to put a's requests
    assert plan_migrations([a, full], MigrationPolicyConfig(defrag=True), 100.0, {}) == []


def test_defrag_makes_room_elsewhere_first_and_the_head_follows_in_a_later_round():
    # the head waits on `a`, whose running request fits nowhere else, and so does `c`'s; `b`'s large one goes to
    # `c`, and only in the next round (once that move has landed) does the head go to `b`
    a = inst("a", 44, req("a1", 800), req("w", 896, status="waiting"))
    b = inst("b", 30, req("b-big", 640), req("b-small", 320))
    c = inst("c", 45, req("c1", 880))
    cfg = MigrationPolicyConfig(defrag=True, target_freeness=1000)
    moves = plan_migrations([a, b, c], cfg, 100.0, {})
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("b-big", "b", "c")]
    landed_b, landed_c = inst("b", 70, req("b-small", 320)), inst("c", 5, req("c1", 880), req("b-big", 640))
    moves = plan_migrations([a, landed_b, landed_c], cfg, 101.0, {})
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("w", "a", "b")]
    assert moves[0].reason == "defrag: the head of a's queue (56 blocks) is admitted on b"


def test_a_queue_head_that_waited_long_goes_where_it_is_admitted_now_whatever_the_freeness():
    a = inst("a", 30, req("a1", 640), req("w", 320, status="waiting"), head_wait=2.5)   # 20-block head
    b = inst("b", 40, req("b1", 480), req("b2", 480))          # freeness 20: no ordinary destination
    assert plan([a, b]) == []
    cfg = MigrationPolicyConfig(queue_delay_s=2.0)
    moves = plan_migrations([a, b], cfg, 100.0, {})
    assert [(m.request_id, m.src, m.dst) for m in moves] == [("w", "a", "b")]
    assert moves[0].reason == "the head of a's queue has waited 2.5 s; b admits it now (20 blocks)"
    assert plan([inst("a", 30, req("a1", 640), req("w", 320, status="waiting"), head_wait=1.0), b], cfg) == []
    tight = inst("b", 25, req("b1", 480), req("b2", 480))      # 20 blocks + 2 running + 4 headroom > 25
    assert plan([a, tight], cfg) == []
