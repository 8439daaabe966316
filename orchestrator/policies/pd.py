"""Prefill/decode disaggregation: which instances take new prompts, which request is handed from a prefill
instance to which decode instance, and (behind a flag) when an instance changes role.

Roles: "prefill" instances take new requests and hand each one over after its first token; "decode"
instances take hand-overs and balance among themselves; "both" instances do everything (colocated serving,
the default). Nothing waits on a role: with no prefill (or both) instance serving, decode instances take new
requests; with no decode instance able to take a request, it keeps decoding where it is.

Pure: instance states come in (`InstanceState` of the migration policy, with `role` beside them), moves and
role changes go out. The scheduler carries them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from instance.kv_cache import blocks_for
from orchestrator.policies.dispatch import Candidate, freeness
from orchestrator.policies.migration import InstanceState, PlannedMove

BOTH, PREFILL, DECODE = "both", "prefill", "decode"
ROLES = (BOTH, PREFILL, DECODE)


def check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role: unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role


def takes_prompts(roles: dict[str, str], serving: list[str]) -> list[str]:
    """The serving instances new requests may go to: prefill and both ones, or all of them if there are none."""
    pool = [i for i in serving if roles.get(i, BOTH) != DECODE]
    return pool or list(serving)


def takes_decodes(roles: dict[str, str], serving: list[str]) -> list[str]:
    """The serving instances requests may decode on after a hand-over or a rebalancing move."""
    return [i for i in serving if roles.get(i, BOTH) != PREFILL]


@dataclass(frozen=True)
class HandoffConfig:
    headroom_blocks: int = 4        # free blocks a decode instance keeps after taking a request
    max_per_source: int = 4         # hand-overs in flight out of one prefill instance (MigrationConfig.max_concurrent)
    max_per_destination: int = 4    # ... and into one decode instance
    batch_slots: int | None = None  # requests a decode instance runs at once (max_num_seqs); None: unbounded


def plan_handoffs(prefill: list[InstanceState], decode: list[InstanceState], in_flight: set[str],
                  cfg: HandoffConfig) -> list[PlannedMove]:
    """Hand-overs from prefill instances to decode instances.

    Every running request of a prefill instance goes, as soon as it is admitted (the hand-over pre-copies its
    prompt's blocks while the prefill runs and moves it right after the first token), oldest first. The
    destination is the freest decode instance that has room for the request's blocks after its first token
    plus `headroom_blocks`, a free batch slot, and fewer than `max_per_destination` hand-overs coming in;
    each pick is counted against it. A request no decode instance has room for is left where it is (it
    decodes there) and tried again next round. `in_flight`: requests already moving."""
    room = {d.instance_id: d.load.free_blocks - d.load.waiting_demand_blocks for d in decode}
    slots = {d.instance_id: (cfg.batch_slots - d.load.num_running - d.load.num_waiting
                             if cfg.batch_slots is not None else math.inf) for d in decode}
    incoming = {d.instance_id: d.migrations_in for d in decode}
    score = {d.instance_id: freeness(Candidate(d.instance_id, d.load)) for d in decode}
    moves: list[PlannedMove] = []
    for src in prefill:
        # the status may not show the scheduler's latest launches yet, nor the scheduler its last ends
        budget = cfg.max_per_source - max(src.migrations_out, sum(r.request_id in in_flight for r in src.requests))
        for req in src.requests:
            if budget <= 0:
                break
            if req.status != "running" or req.request_id in in_flight or req.num_output_tokens >= req.max_tokens:
                continue
            need = blocks_for(max(req.num_tokens, req.num_prompt_tokens + 1), src.load.block_size)
            fits = [d for d in decode if d.instance_id != src.instance_id
                    and room[d.instance_id] - need >= cfg.headroom_blocks and slots[d.instance_id] >= 1
                    and incoming[d.instance_id] < cfg.max_per_destination]
            if not fits:
                continue
            dst = min(fits, key=lambda d: (-score[d.instance_id], d.instance_id))
            moves.append(PlannedMove(req.request_id, src.instance_id, dst.instance_id,
                                     f"hand-over {src.instance_id} -> {dst.instance_id} "
                                     f"({req.num_prompt_tokens}-token prompt, {need} blocks, "
                                     f"{room[dst.instance_id]} free there)"))
            room[dst.instance_id] -= need
            slots[dst.instance_id] -= 1
            incoming[dst.instance_id] += 1
            score[dst.instance_id] = (room[dst.instance_id]) / max(1, dst.load.num_running + 1)
            budget -= 1
    return moves


def plan_prompt_returns(decode: list[InstanceState], prefill: list[InstanceState], in_flight: set[str],
                        headroom_blocks: int = 4) -> list[PlannedMove]:
    """Queued prompts on decode instances (one became a decode instance with a queue, or took new requests
    while no prefill instance served) go to the prefill instance with the most room. Only requests that have
    never run move: a preempted one has output and decodes where it is."""
    room = {p.instance_id: p.load.free_blocks - p.load.waiting_demand_blocks for p in prefill}
    moves: list[PlannedMove] = []
    for src in decode:
        for req in src.requests:
            if (req.status != "waiting" or req.num_output_tokens > 0 or req.num_computed_tokens > 0
                    or req.request_id in in_flight):
                continue
            need = blocks_for(req.num_prompt_tokens + 1, src.load.block_size)
            fits = [p for p in prefill if p.instance_id != src.instance_id and room[p.instance_id] - need >= 0]
            if not fits:
                continue
            dst = max(fits, key=lambda p: (room[p.instance_id], p.instance_id))
            room[dst.instance_id] -= need
            moves.append(PlannedMove(req.request_id, src.instance_id, dst.instance_id,
                                     f"queued prompt on decode instance {src.instance_id} -> prefill instance "
                                     f"{dst.instance_id} ({req.num_prompt_tokens} tokens)"))
    return moves


# ----- adaptive roles ------------------------------------------------------------------------------------------

class AdaptiveConfig(BaseModel):
    """When an instance changes role (`pd:` section of a deployment's config, behind `pd.adaptive`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_high: float = Field(2.0, gt=0, description="waiting prompts per prefill instance that make prefill the "
                              "bottleneck")
    tpot_target_ms: float = Field(0.0, ge=0, description="decode step time above which decode is the bottleneck "
                                  "(0: not used)")
    decode_freeness_low: float = Field(8.0, description="... or a decode instance's freeness below this")
    cooldown_s: float = Field(10.0, ge=0, description="at least this long between role changes")


@dataclass(frozen=True)
class RoleChange:
    instance_id: str
    role: str
    reason: str


def adapt_roles(states: list[InstanceState], roles: dict[str, str], cfg: AdaptiveConfig, now: float,
                last_change_at: float) -> RoleChange | None:
    """At most one instance switches between prefill and decode, and only when one side is the bottleneck
    and the other is not, so it does not flap: prefill is when prompts queue on the prefill instances
    (TTFT grows); decode is when a decode instance queues or preempts requests, runs low on free blocks, or
    its step time exceeds the TPOT target. Each side keeps at least one instance; "both" instances stay."""
    if now - last_change_at < cfg.cooldown_s:
        return None
    pre = [s for s in states if s.accepting and roles.get(s.instance_id) == PREFILL]
    dec = [s for s in states if s.accepting and roles.get(s.instance_id) == DECODE]
    if not pre or not dec:
        return None
    queued = sum(s.load.num_waiting for s in pre) / len(pre)
    prefill_hot = queued >= cfg.queue_high
    pressured = [s for s in dec if _decode_pressure(s, cfg)]
    decode_hot = bool(pressured)
    if prefill_hot and not decode_hot and len(dec) > 1:
        pick = min(dec, key=lambda s: (s.load.num_running, s.instance_id))
        return RoleChange(pick.instance_id, PREFILL, f"prefill is the bottleneck: {queued:.1f} prompts queued "
                                                     f"per prefill instance, decode instances have room")
    if decode_hot and not prefill_hot and len(pre) > 1 and all(s.load.num_waiting == 0 for s in pre):
        pick = min(pre, key=lambda s: (s.load.num_running, s.instance_id))
        return RoleChange(pick.instance_id, DECODE, f"decode is the bottleneck: "
                                                    f"{_decode_pressure(pressured[0], cfg)}; no prompt queued")
    return None


def _decode_pressure(s: InstanceState, cfg: AdaptiveConfig) -> str:
    """Why this decode instance is a bottleneck, or '' if it is not."""
    if s.load.num_waiting or s.load.num_preempted:
        return f"{s.instance_id} has {s.load.num_waiting} waiting, {s.load.num_preempted} preempted"
    f = freeness(Candidate(s.instance_id, s.load))
    if f < cfg.decode_freeness_low:
        return f"{s.instance_id} freeness {f:.1f} < {cfg.decode_freeness_low:g}"
    if cfg.tpot_target_ms and s.load.num_running and s.load.step_time_ms > cfg.tpot_target_ms:
        return f"{s.instance_id} step {s.load.step_time_ms:.0f} ms > {cfg.tpot_target_ms:g} ms"
    return ""
