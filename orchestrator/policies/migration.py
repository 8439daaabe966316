"""Migration: which request to move, from which instance to which (Llumnix-style rebalancing), and
where every request of a draining instance goes.

Freeness is Llumnix's (`dispatch.freeness`: capacity minus virtual usage, per request in the batch). An instance
gives work away when its freeness is below `source_freeness`, or it has waiting or preempted requests, or it drains
(infinite virtual usage: it gives everything, cooldown or not); an accepting instance with an empty queue and
freeness above `target_freeness` takes it. A source with a waiting queue first offers its waiting requests, head
first (up to `max_waiting_offers`): one that has not started has no KV to copy, so moving it costs a hand-over and
nothing else, and it starts at once on an instance with room instead of waiting behind the queue; a running request
goes only if no waiting one fits anywhere. A round pairs the lowest-freeness sources with the highest-freeness
destinations, at most `max_moves` times, and after each pick updates its own view of both instances, so one round
neither floods a destination nor keeps draining a source that is no longer loaded.

Priorities: a high-priority request (priority > 0) adds `high_priority_headroom` x capacity to its instance's
virtual usage. An instance that is a source only because of that headroom gives away normal requests only, so
normal work moves away from instances serving high-priority requests and high-priority requests stay put; a
source that is loaded anyway gives its lowest-priority requests first.

A request that rebalancing moved stays where it went for `request_cooldown_s` (the caller passes when each
request last moved, `moved_at`): on a loaded cluster the snapshots lag the moves, and without it a request
can bounce between two instances, paying the hand-over each time.

Two more levers, off by default (the simulator's sweep measures each, `benchmarks/sim_sweep.py`):
- queueing delay (`queue_delay_s`): an instance whose queue head has waited that long is a source whatever its
  freeness, and the head goes to the freest instance it fits on (a lagging snapshot cannot hide a stuck queue);
- de-fragmentation (`defrag`): when a queue's head fits on no instance although the cluster's free blocks
  would hold it, running requests move off the instance with the most free blocks to others with room, until the
  head fits there (Llumnix's de-fragmentation; it only runs in a round that found no ordinary move).

Pure: the clock comes in as `now`, `last_move_at` and `moved_at`; the caller records them for the moves it
carries out. The caller also leaves out of `InstanceState.requests` any request already being migrated (it
still runs on the source while its blocks are pre-copied). All instances are assumed to share one block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from instance.backend import LoadSnapshot, RequestInfo
from instance.kv_cache import blocks_for
from orchestrator.policies.dispatch import HIGH_PRIORITY_HEADROOM, Candidate, freeness

MOVE_CHOICES = ("shortest", "longest", "lowest-priority", "newest")


class MigrationPolicyConfig(BaseModel):
    """The rebalancing policy's settings (the `rebalance:` section of a deployment's config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_freeness: float = Field(8.0, description="below this freeness an instance gives work away ...")
    target_freeness: float = Field(24.0, description="... above this (and with an empty queue) it takes work")
    choose: str = Field("shortest", description="which request moves: " + " | ".join(MOVE_CHOICES))
    min_remaining_tokens: int = Field(16, ge=0, description="a request this close to max_tokens finishes where "
                                      "it is")
    max_moves: int = Field(2, ge=1, description="moves per round")
    cooldown_s: float = Field(1.0, ge=0, description="an instance takes part in no move for this long after its "
                              "last one")
    request_cooldown_s: float = Field(10.0, ge=0, description="a request that rebalancing moved is not moved "
                                      "again for this long")
    headroom_blocks: int = Field(4, ge=0, description="free blocks a destination keeps after taking a request")
    max_waiting_offers: int = Field(4, ge=0, description="waiting requests (head first) a queued source offers "
                                    "before a running one; 0 moves running requests only")
    high_priority_headroom: float = Field(HIGH_PRIORITY_HEADROOM, ge=0, description="share of capacity set aside "
                                          "per high-priority request")
    defrag: bool = Field(False, description="when a queue's head fits on no instance, move running requests off "
                         "one instance to make room for it (de-fragmentation)")
    queue_delay_s: float = Field(0.0, ge=0, description="an instance whose queue head has waited this long is a "
                                 "source whatever its freeness (0: off)")

    @field_validator("choose")
    @classmethod
    def _known_choice(cls, choose: str) -> str:
        if choose not in MOVE_CHOICES:
            raise ValueError(f"unknown choice {choose!r}; choose one of {', '.join(MOVE_CHOICES)}")
        return choose

    @model_validator(mode="after")
    def _thresholds_apart(self) -> "MigrationPolicyConfig":
        if self.source_freeness >= self.target_freeness:
            raise ValueError(f"source_freeness ({self.source_freeness:g}) must be below target_freeness "
                             f"({self.target_freeness:g}), or an instance could give and take work at once")
        return self


@dataclass(frozen=True)
class InstanceState:
    instance_id: str
    load: LoadSnapshot
    requests: tuple[RequestInfo, ...]  # in arrival order, as `list_requests` gives them
    accepting: bool = True             # False while draining, dead or starting: never a destination
    migrations_out: int = 0            # in flight from here
    migrations_in: int = 0             # in flight to here
    draining: bool = False             # infinite virtual usage: gives all its running requests away


@dataclass(frozen=True)
class PlannedMove:
    request_id: str
    src: str
    dst: str
    reason: str


def blocks_of(request: RequestInfo, block_size: int) -> int:
    return blocks_for(request.num_tokens, block_size)


def _free(inst: InstanceState, cfg: MigrationPolicyConfig, headroom: bool = True) -> float:
    """Llumnix freeness (-inf while draining); without the high-priority headroom if `headroom` is False."""
    return freeness(Candidate(inst.instance_id, inst.load, draining=inst.draining),
                    cfg.high_priority_headroom if headroom else 0.0)


def _room(inst: InstanceState) -> int:
    """Free blocks not already promised to the waiting queue."""
    return inst.load.free_blocks - inst.load.waiting_demand_blocks


def choose_request(requests, cfg: MigrationPolicyConfig, block_size: int,
                   normal_only: bool = False) -> RequestInfo | None:
    """The running request to move, or None. Only requests with computed KV and at least
    `min_remaining_tokens` left to generate qualify, and only normal-priority ones (priority <= 0) if
    `normal_only`. Among those of the lowest priority, orders by tokens, which orders blocks (`block_size`)
    the same way; "newest" is the last to arrive (LCR in Llumnix); ties go to the smallest request id."""
    movable = [r for r in requests if r.status == "running" and r.num_computed_tokens > 0
               and r.max_tokens - r.num_output_tokens >= cfg.min_remaining_tokens
               and not (normal_only and r.priority > 0)]
    if not movable:
        return None
    lowest = min(r.priority for r in movable)
    movable = [r for r in movable if r.priority == lowest]
    if cfg.choose == "newest":
        return movable[-1]
    keys = {"shortest": lambda r: (r.num_tokens, r.request_id),
            "longest": lambda r: (-r.num_tokens, r.request_id),
            "lowest-priority": lambda r: (r.priority, r.num_tokens, r.request_id)}
    return min(movable, key=keys[cfg.choose])


def _waiting_in_queue_order(inst: InstanceState) -> list[RequestInfo]:
    """The waiting requests of `inst` in the order the instance admits them: priority, then arrival."""
    order = {r.request_id: n for n, r in enumerate(inst.requests)}
    return sorted((r for r in inst.requests if r.status == "waiting"),
                  key=lambda r: (-r.priority, order[r.request_id]))


def _offers(inst: InstanceState, cfg: MigrationPolicyConfig, settled: frozenset[str] = frozenset()
            ) -> list[RequestInfo]:
    """What `inst` would give away this round, best first; [] if it is not a source. A queued (or draining)
    source offers its first `max_waiting_offers` waiting requests, then the running one `choose_request`
    picks; a source loaded only by the headroom of its high-priority requests offers a normal running one.
    Requests in `settled` (moved within `request_cooldown_s`) are not offered, except by a draining instance."""
    if inst.draining:
        settled = frozenset()
    queued = inst.load.num_waiting > 0 or inst.load.num_preempted > 0
    mine = [r for r in inst.requests if r.request_id not in settled]
    if inst.draining or queued or _free(inst, cfg, headroom=False) < cfg.source_freeness:
        waiting = [r for r in _waiting_in_queue_order(inst) if r.request_id not in settled] \
            if queued or inst.draining else []
        running = choose_request(mine, cfg, inst.load.block_size)
        return waiting[:cfg.max_waiting_offers] + ([running] if running is not None else [])
    if _free(inst, cfg) < cfg.source_freeness:     # loaded only by the headroom of its high-priority requests
        running = choose_request(mine, cfg, inst.load.block_size, normal_only=True)
        return [running] if running is not None else []
    return []


def is_source(inst: InstanceState, cfg: MigrationPolicyConfig, settled: frozenset[str] = frozenset()) -> bool:
    return bool(_offers(inst, cfg, settled))


def recent_moves(moved_at: dict[str, float], now: float, cfg: MigrationPolicyConfig) -> dict[str, float]:
    """The entries of `moved_at` (request id -> when rebalancing moved it) still within `request_cooldown_s`;
    callers keep only these, so the map does not grow."""
    return {rid: t for rid, t in moved_at.items() if now - t < cfg.request_cooldown_s}


def pick_destination(candidates: list[InstanceState], exclude: set[str], blocks_needed: int,
                     cfg: MigrationPolicyConfig) -> InstanceState | None:
    fits = [c for c in candidates if c.accepting and not c.draining and c.instance_id not in exclude
            and c.load.num_waiting == 0 and _free(c, cfg) > cfg.target_freeness
            and _room(c) - blocks_needed >= cfg.headroom_blocks]
    return min(fits, key=lambda c: (-_free(c, cfg), c.instance_id), default=None)


def plan_migrations(instances: list[InstanceState], cfg: MigrationPolicyConfig, now: float,
                    last_move_at: dict[str, float], moved_at: dict[str, float] | None = None) -> list[PlannedMove]:
    """Up to `max_moves` moves from the most loaded instances to the freest; [] when balanced. Instances in
    cooldown or with a migration in flight (their snapshot does not show its effect yet) sit the round out,
    except draining ones, which give a request every round. `moved_at`: request id -> when rebalancing last
    moved it; those moved within `request_cooldown_s` stay put (a draining instance still gives them)."""
    settled = frozenset(recent_moves(moved_at or {}, now, cfg))
    view = {i.instance_id: i for i in instances
            if i.draining or (now - last_move_at.get(i.instance_id, -math.inf) >= cfg.cooldown_s
                              and i.migrations_in == 0 and i.migrations_out == 0)}
    gave: set[str] = set()
    took: set[str] = set()
    moves: list[PlannedMove] = []
    while len(moves) < cfg.max_moves:
        sources = sorted((i for i in view.values() if i.instance_id not in took and is_source(i, cfg, settled)),
                         key=lambda i: (_free(i, cfg), i.instance_id))
        req, src, dst = _first_fit(sources, list(view.values()), gave, cfg, settled)
        if dst is None:
            break
        moves.append(PlannedMove(req.request_id, src.instance_id, dst.instance_id,
                                 f"{_why_source(src, cfg)} -> {dst.instance_id} freeness {_free(dst, cfg):.1f}; "
                                 f"{_why_request(req, cfg.choose)}"))
        gave.add(src.instance_id)
        took.add(dst.instance_id)
        view[src.instance_id], view[dst.instance_id] = _give(src, req), _take(dst, req)
    if cfg.queue_delay_s > 0 and len(moves) < cfg.max_moves:
        moves += _waited_heads(view, cfg, settled, gave | took, cfg.max_moves - len(moves))
    if cfg.defrag and not moves:
        moves = plan_defrag(list(view.values()), cfg, settled)
    return moves


def _waited_heads(view: dict[str, InstanceState], cfg: MigrationPolicyConfig, settled: frozenset[str],
                  busy: set[str], n: int) -> list[PlannedMove]:
    """The queueing-delay trigger: the head of a queue that has waited `queue_delay_s` or longer moves to an
    instance with an empty queue that admits it now, whatever the two instances' freeness (ordinary
    rebalancing wants a destination above `target_freeness`, which a loaded cluster may not have while one
    of its instances could start the head at once). Longest waits first; each instance in one move at most."""
    moves: list[PlannedMove] = []
    for src in sorted(view.values(), key=lambda i: (-i.load.head_wait_s, i.instance_id)):
        if len(moves) >= n or src.load.head_wait_s < cfg.queue_delay_s:
            break
        if src.instance_id in busy:
            continue
        heads = [r for r in _waiting_in_queue_order(src) if r.request_id not in settled]
        if not heads:
            continue
        head, need = heads[0], blocks_of(heads[0], src.load.block_size)
        fits = [d for d in view.values() if d.accepting and not d.draining and d.instance_id not in busy
                and d.instance_id != src.instance_id and d.load.num_waiting == 0
                and _admissible(d, need + cfg.headroom_blocks)]
        dst = min(fits, key=lambda d: (-_room(d), d.instance_id), default=None)
        if dst is None:
            continue
        moves.append(PlannedMove(head.request_id, src.instance_id, dst.instance_id,
                                 f"the head of {src.instance_id}'s queue has waited {src.load.head_wait_s:.1f} s; "
                                 f"{dst.instance_id} admits it now ({need} blocks)"))
        busy |= {src.instance_id, dst.instance_id}
        view[src.instance_id], view[dst.instance_id] = _give(src, head), _take(dst, head)
    return moves


def _admissible(inst: InstanceState, need: int) -> bool:
    """Whether a prompt needing `need` blocks is admitted on `inst` now: the engine admits one whose blocks fit
    with one to spare per running request (instance/scheduler.py)."""
    return inst.load.free_blocks - need - inst.load.num_running >= 0


def plan_defrag(instances: list[InstanceState], cfg: MigrationPolicyConfig,
                settled: frozenset[str] = frozenset()) -> list[PlannedMove]:
    """De-fragmentation (Llumnix's virtual usage of the queue head, acted on deliberately). For the head of an
    instance's queue that its own instance cannot admit now: if another accepting instance with an empty queue
    admits it, the head moves there; if none does, room is made for it — its running requests, largest first, go to
    instances with room — on its own instance if that can be done within `max_moves`, else on the instance with
    the most free blocks, and the head follows in a later round, once those moves have landed (moving it in the same round would race them for the blocks). [] when
    every head is admitted at home or no room can be made this round."""
    accepting = [i for i in instances if i.accepting and not i.draining]
    heads = [(i, _waiting_in_queue_order(i)[0]) for i in instances
             if i.load.num_waiting and i.load.head_demand_blocks > 0 and _waiting_in_queue_order(i)]
    for home, head in sorted(heads, key=lambda h: -h[0].load.head_demand_blocks):
        need = home.load.head_demand_blocks
        if _admissible(home, need) or head.request_id in settled:
            continue
        there = [o for o in accepting if o is not home and o.load.num_waiting == 0 and _admissible(o, need)]
        if there:
            dst = min(there, key=lambda o: (-_room(o), o.instance_id))
            return [PlannedMove(head.request_id, home.instance_id, dst.instance_id,
                                f"defrag: the head of {home.instance_id}'s queue ({need} blocks) is admitted on "
                                f"{dst.instance_id}")]
        if any(_admissible(o, need) for o in accepting):
            continue        # admitted where another queue waits: that queue goes first
        for target in sorted(accepting, key=lambda o: (o is not home, -(o.load.free_blocks - o.load.num_running),
                                                       o.instance_id)):
            moves = _make_room(target, need, [o for o in accepting if o is not target], cfg, settled)
            if moves is not None:
                return moves
    return []


def _make_room(target: InstanceState, need: int, others: list[InstanceState], cfg: MigrationPolicyConfig,
               settled: frozenset[str]) -> list[PlannedMove] | None:
    """Moves of `target`'s running requests (largest first) to `others` after which a `need`-block prompt is
    admitted on `target`; None if that cannot be done within `max_moves`."""
    view = {o.instance_id: o for o in others}
    moves: list[PlannedMove] = []
    running = sorted((r for r in target.requests if r.status == "running" and r.num_computed_tokens > 0
                      and r.request_id not in settled),
                     key=lambda r: (-r.num_tokens, r.request_id))
    for req in running:
        if _admissible(target, need) or len(moves) >= cfg.max_moves:
            break
        blocks = blocks_of(req, target.load.block_size)
        dst = min((o for o in view.values() if _room(o) - blocks >= cfg.headroom_blocks),
                  key=lambda o: (-_room(o), o.instance_id), default=None)
        if dst is None:
            continue
        moves.append(PlannedMove(req.request_id, target.instance_id, dst.instance_id,
                                 f"defrag: making room for a {need}-block prompt on {target.instance_id}; "
                                 f"running request ({req.num_tokens} tokens) -> {dst.instance_id}"))
        target, view[dst.instance_id] = _give(target, req), _take(dst, req)
    return moves if moves and _admissible(target, need) else None


def _first_fit(sources: list[InstanceState], view: list[InstanceState], gave: set[str], cfg: MigrationPolicyConfig,
               settled: frozenset[str]) -> tuple[RequestInfo | None, InstanceState | None, InstanceState | None]:
    """The first (request, source, destination) that fits, trying sources in order and each one's offers in
    order; (None, None, None) if nothing fits."""
    for src in sources:
        for req in _offers(src, cfg, settled):
            dst = pick_destination(view, gave | {src.instance_id}, blocks_of(req, src.load.block_size), cfg)
            if dst is not None:
                return req, src, dst
    return None, None, None


def plan_drain(draining: InstanceState, others: list[InstanceState], cfg: MigrationPolicyConfig
               ) -> tuple[list[PlannedMove], list[tuple[str, str]]]:
    """A destination for every running and waiting request of `draining` (suspended ones are already on
    their way): the freest accepting instance with room, seeing what earlier picks took. Cooldown and
    `min_remaining_tokens` do not apply. Returns (moves, [(request_id, why it cannot move)])."""
    view = {o.instance_id: o for o in others
            if o.accepting and not o.draining and o.instance_id != draining.instance_id}
    todo = sorted((r for r in draining.requests if r.status in ("running", "waiting")),
                  key=lambda r: (r.status != "running", -r.num_tokens, r.request_id))
    moves: list[PlannedMove] = []
    stuck: list[tuple[str, str]] = []
    for req in todo:
        need = blocks_of(req, draining.load.block_size)
        fits = [o for o in view.values() if _room(o) - need >= cfg.headroom_blocks]
        if not fits:
            stuck.append((req.request_id, _why_stuck(view, need, cfg)))
            continue
        dst = min(fits, key=lambda o: (-_free(o, cfg), o.instance_id))
        moves.append(PlannedMove(req.request_id, draining.instance_id, dst.instance_id,
                                 f"drain {draining.instance_id} -> {dst.instance_id} freeness {_free(dst, cfg):.1f}; "
                                 f"{req.status} request ({req.num_tokens} tokens, {need} blocks)"))
        view[dst.instance_id] = _take(dst, req)
    return moves, stuck


def _why_source(inst: InstanceState, cfg: MigrationPolicyConfig) -> str:
    if inst.draining:
        return f"{inst.instance_id} drains"
    queue = ", ".join(f"{n} {what}" for n, what in ((inst.load.num_waiting, "waiting"),
                                                    (inst.load.num_preempted, "preempted")) if n)
    free = _free(inst, cfg)
    if free < cfg.source_freeness:
        high = inst.load.num_high_priority
        return (f"{inst.instance_id} freeness {free:.1f} < {cfg.source_freeness:g}"
                + (f" ({queue})" if queue else "")
                + (f" (headroom for {high} high-priority)" if high and cfg.high_priority_headroom else ""))
    return f"{inst.instance_id} has {queue} (freeness {free:.1f})"


def _why_request(req: RequestInfo, choose: str) -> str:
    if req.status == "waiting":
        return f"waiting request ({req.num_tokens} tokens, not started: no KV to copy)"
    if choose == "lowest-priority":
        return f"lowest-priority request (priority {req.priority}, {req.num_tokens} tokens)"
    return f"{choose} request ({req.num_tokens} tokens)"


def _why_stuck(view: dict[str, InstanceState], need: int, cfg: MigrationPolicyConfig) -> str:
    if not view:
        return "no accepting instance to take it"
    best = min(view.values(), key=lambda o: (-_room(o), o.instance_id))
    return (f"no instance has room for {need} blocks + {cfg.headroom_blocks} headroom "
            f"(most: {best.instance_id} with {_room(best)} free)")


def _give(inst: InstanceState, req: RequestInfo) -> InstanceState:
    """`inst` as it will be once `req` has left."""
    n, ld = blocks_of(req, inst.load.block_size), inst.load
    ld = replace(ld, num_high_priority=max(0, ld.num_high_priority - (req.priority > 0)))
    if req.status == "waiting":
        ld = replace(ld, num_waiting=ld.num_waiting - 1, waiting_demand_blocks=max(0, ld.waiting_demand_blocks - n),
                     num_preempted=ld.num_preempted - (req.num_preemptions > 0))
    else:
        ld = replace(ld, num_running=ld.num_running - 1, free_blocks=ld.free_blocks + n, used_blocks=ld.used_blocks - n)
    return replace(inst, load=ld, requests=tuple(r for r in inst.requests if r.request_id != req.request_id))


def _take(inst: InstanceState, req: RequestInfo) -> InstanceState:
    """`inst` as it will be once `req` has arrived (a waiting request joins its queue)."""
    n, ld = blocks_of(req, inst.load.block_size), inst.load
    ld = replace(ld, num_high_priority=ld.num_high_priority + (req.priority > 0))
    if req.status == "waiting":
        ld = replace(ld, num_waiting=ld.num_waiting + 1, waiting_demand_blocks=ld.waiting_demand_blocks + n)
    else:
        ld = replace(ld, num_running=ld.num_running + 1, free_blocks=ld.free_blocks - n, used_blocks=ld.used_blocks + n)
    return replace(inst, load=ld, requests=inst.requests + (req,))
