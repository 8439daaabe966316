"""Where each routed expert lives, and the pure planner that changes it.

A placement maps every (layer, expert) of an MoE model to exactly one rank: `LEADER` (the instance's own
process) or an expert worker's id. The planner takes the current placement, the ranks wanted and the observed
load of each expert (tokens routed to it, a moving average) and returns the new placement and the moves:

- every expert of every layer is placed exactly once (no replicas, so no expert's GEMM changes shape);
- per layer, ranks hold floor(E/N) or ceil(E/N) experts (memory stays even) and, within that, the experts
  that must move go heaviest first to the rank with the least load (LPT), so per-layer load is balanced;
- an expert stays where it is whenever its rank is still wanted, has room and stays within 10% of its fair
  share of the load (few moves); with no load observed, asking again for the ranks a placement already has
  returns no moves (the scaler treats the same EP size as a no-op before planning).
"""

from __future__ import annotations

from dataclasses import dataclass

LEADER = "leader"

Key = tuple[int, int]          # (layer, expert)
BALANCE_SLACK = 0.1            # a rank keeps experts while its load stays within 10% of the fair share


@dataclass(frozen=True)
class Move:
    layer: int
    expert: int
    src: str
    dst: str


class Placement:
    """(layer, expert) -> rank. Immutable by convention: the planner returns a new one."""

    def __init__(self, owner: dict[Key, str]):
        self.owner = dict(owner)

    @classmethod
    def on_leader(cls, layers: list[int], num_experts: int) -> "Placement":
        return cls({(l, e): LEADER for l in layers for e in range(num_experts)})

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.owner})

    def ranks(self) -> list[str]:
        """Ranks that own at least one expert, the leader first."""
        ranks = set(self.owner.values())
        return ([LEADER] if LEADER in ranks else []) + sorted(ranks - {LEADER})

    def experts_of(self, rank: str, layer: int | None = None) -> list[Key]:
        return sorted(k for k, r in self.owner.items() if r == rank and (layer is None or k[0] == layer))

    def layer_owners(self, layer: int) -> dict[int, str]:
        return {e: r for (l, e), r in sorted(self.owner.items()) if l == layer}

    def check(self, layers: list[int], num_experts: int) -> None:
        want = {(l, e) for l in layers for e in range(num_experts)}
        if set(self.owner) != want:
            missing, extra = sorted(want - set(self.owner)), sorted(set(self.owner) - want)
            raise AssertionError(f"placement: experts missing {missing[:4]} or unknown {extra[:4]}")

    def __eq__(self, other) -> bool:
        return isinstance(other, Placement) and self.owner == other.owner

    def __repr__(self) -> str:
        return f"Placement({ {r: len(self.experts_of(r)) for r in self.ranks()} })"


def plan(current: Placement, ranks: list[str], load: dict[Key, float] | None = None) -> tuple[Placement, list[Move]]:
    """The placement over `ranks` (distinct; order decides which ranks take the odd extra expert when
    E % N != 0, after the ones that already hold most) and the moves from `current` to it."""
    if not ranks or len(set(ranks)) != len(ranks):
        raise ValueError(f"placement: ranks must be distinct and non-empty, got {ranks}")
    load = load or {}
    owner: dict[Key, str] = {}
    for layer in current.layers:
        owner.update(_plan_layer(layer, current.layer_owners(layer), ranks, load))
    moves = [Move(l, e, current.owner[(l, e)], r) for (l, e), r in sorted(owner.items())
             if current.owner[(l, e)] != r]
    return Placement(owner), moves


def _plan_layer(layer: int, owners: dict[int, str], ranks: list[str], load: dict[Key, float]) -> dict[Key, str]:
    experts = sorted(owners)
    n, e = len(ranks), len(experts)
    weight = {x: load.get((layer, x), 0.0) for x in experts}
    held = {r: [x for x in experts if owners[x] == r] for r in ranks}
    # capacities: floor(E/N) each; the E % N extra slots go to the ranks that already hold the most
    by_held = sorted(ranks, key=lambda r: (-len(held[r]), ranks.index(r)))
    cap = {r: e // n + (1 if i < e % n else 0) for i, r in enumerate(by_held)}
    fair = sum(weight.values()) / n * (1 + BALANCE_SLACK)
    placed: dict[int, str] = {}
    for r in ranks:       # stay put: what a rank already has, heaviest first, up to its cap and its fair load
        kept = 0.0
        for x in sorted(held[r], key=lambda x: (-weight[x], x)):
            if sum(1 for o in placed.values() if o == r) >= cap[r]:
                break
            if kept and kept + weight[x] > fair:
                continue
            placed[x] = r
            kept += weight[x]
    total = {r: sum(weight[x] for x, o in placed.items() if o == r) for r in ranks}
    count = {r: sum(1 for o in placed.values() if o == r) for r in ranks}
    for x in sorted((x for x in experts if x not in placed), key=lambda x: (-weight[x], x)):
        r = min((r for r in ranks if count[r] < cap[r]), key=lambda r: (total[r], count[r], ranks.index(r)))
        placed[x] = r
        total[r] += weight[x]
        count[r] += 1
    return {(layer, x): r for x, r in placed.items()}


def rank_loads(placement: Placement, load: dict[Key, float]) -> dict[str, float]:
    """Each rank's share of the observed load (sums to 1 when there is any load)."""
    total = sum(load.values()) or 1.0
    out = {r: 0.0 for r in placement.ranks()}
    for k, r in placement.owner.items():
        out[r] += load.get(k, 0.0) / total
    return out
