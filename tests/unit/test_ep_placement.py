"""The expert placement planner: every expert once, even counts, balanced by observed load, few moves, and
the same target twice is no move at all."""

import random

import pytest

from instance.ep.placement import LEADER, Placement, plan, rank_loads

LAYERS, E = [0, 1, 2], 8


def load_of(seed: int) -> dict:
    rng = random.Random(seed)
    return {(l, e): rng.expovariate(1.0) * 100 for l in LAYERS for e in range(E)}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
def test_every_expert_is_placed_once_with_even_counts(n):
    ranks = [LEADER] + [f"w{i}" for i in range(n - 1)]
    p, moves = plan(Placement.on_leader(LAYERS, E), ranks, load_of(n))
    p.check(LAYERS, E)
    for l in LAYERS:
        counts = [len(p.experts_of(r, l)) for r in ranks]
        assert max(counts) - min(counts) <= 1 and sum(counts) == E
    if 1 < n <= 4:                                     # under load, shares stay near the fair one
        shares = rank_loads(p, load_of(n))
        assert max(shares.values()) < 1.6 / n
    assert len(moves) >= len(LAYERS) * (E - E // n - (1 if E % n else 0))


def test_the_same_target_again_moves_nothing():
    ranks = [LEADER, "w0", "w1"]
    p, _ = plan(Placement.on_leader(LAYERS, E), ranks)
    again, moves = plan(p, ranks)
    assert moves == [] and again == p


def test_moves_are_few_when_a_rank_joins_or_leaves():
    p2, _ = plan(Placement.on_leader(LAYERS, E), [LEADER, "w0"])
    p3, up = plan(p2, [LEADER, "w0", "w1"])
    assert all(m.dst == "w1" for m in up)             # only the newcomer receives
    assert len(up) == len(LAYERS) * 2                  # 4+4 -> 3+3+2: two experts per layer move
    p1, down = plan(p3, [LEADER])
    assert all(m.dst == LEADER for m in down) and len(down) == len(p3.owner) - len(p3.experts_of(LEADER))
    p2b, down2 = plan(p3, [LEADER, "w0"])
    assert {m.src for m in down2} == {"w1"}            # only the departing rank's experts move


def test_moved_experts_balance_the_observed_load():
    load = {(l, e): (1000.0 if e in (0, 1) else 1.0) for l in LAYERS for e in range(E)}   # two hot experts
    p, _ = plan(Placement.on_leader(LAYERS, E), [LEADER, "w0"], load)
    for l in LAYERS:
        # the leader keeps the heaviest it has (0) and the hottest mover (1) goes to the other rank
        assert {p.owner[(l, 0)], p.owner[(l, 1)]} == {LEADER, "w0"}
    shares = rank_loads(p, load)
    assert abs(shares[LEADER] - shares["w0"]) < 0.01


def test_ranks_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        plan(Placement.on_leader(LAYERS, E), [LEADER, LEADER])
