"""Autoscaling: how many instances a deployment should run, and which one goes on scale-in (Llumnix-style).

The signal is the average freeness of the serving instances, counting normal-priority load only (Llumnix's
`dispatch.freeness` without the high-priority headroom: blocks each request can still grow by). Below
`low_freeness` for `scale_up_delay_s` → one instance more; above `high_freeness` for `scale_down_delay_s` →
one fewer; anywhere in between resets both clocks, so a load that oscillates inside the band never flaps. One
change at a time (none while one is in flight), `cooldown_s` after each, always within `min_instances` ..
`max_instances` (outside them, straight back inside, without delay).

Scale-in takes the instance with the fewest running requests (ties: fewest blocks used, then the id), never
the last serving instance of the prefill or decode role; the caller drains it by migration before stopping it.

Pure: the caller passes the clock (`now`) and the policy's memory (`AutoscaleMemory`), and keeps the memory it
gets back. The live scheduler and the simulator call the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.policies.dispatch import Candidate, freeness
from orchestrator.policies.migration import InstanceState
from orchestrator.policies.pd import BOTH


class AutoscaleConfig(BaseModel):
    """The `autoscale:` section of a deployment's config; off unless `enabled`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(False, description="run the autoscaler in the reconcile loop")
    low_freeness: float = Field(10.0, description="average freeness below which an instance is added ...")
    high_freeness: float = Field(60.0, description="... and above which one is removed")
    scale_up_delay_s: float = Field(30.0, ge=0, description="how long the average must stay low before adding")
    scale_down_delay_s: float = Field(600.0, ge=0, description="how long it must stay high before removing")
    cooldown_s: float = Field(30.0, ge=0, description="no change for this long after the last one")
    min_instances: int = Field(1, ge=1)
    max_instances: int = Field(16, ge=1, le=256)
    interval_s: float = Field(1.0, gt=0, description="how often the policy looks")

    @model_validator(mode="after")
    def _sane(self) -> "AutoscaleConfig":
        if self.low_freeness >= self.high_freeness:
            raise ValueError(f"low_freeness ({self.low_freeness:g}) must be below high_freeness "
                             f"({self.high_freeness:g}), or the autoscaler would add and remove at once")
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) exceeds max_instances ({self.max_instances})")
        return self


@dataclass(frozen=True)
class AutoscaleMemory:
    """What the policy remembers between two calls (the caller keeps it)."""

    low_since: float | None = None          # when the average went below the low mark
    high_since: float | None = None         # ... above the high mark
    last_change_at: float = -math.inf       # when the last change was decided


@dataclass(frozen=True)
class ScaleDecision:
    target: int                             # instances after the change
    remove: str | None                      # on scale-in, the instance to drain and stop
    reason: str


def average_freeness(states: list[InstanceState]) -> float:
    """Mean normal-priority freeness of the accepting instances; inf if none accepts."""
    serving = [s for s in states if s.accepting]
    if not serving:
        return math.inf
    return sum(freeness(Candidate(s.instance_id, s.load), high_priority_headroom=0.0) for s in serving) / len(serving)


def choose_victim(states: list[InstanceState], roles: dict[str, str]) -> InstanceState | None:
    """The accepting instance to remove: fewest running requests, then fewest blocks used, then the id; never
    the last accepting instance of the prefill or decode role. None if none may go."""
    serving = [s for s in states if s.accepting]
    count: dict[str, int] = {}
    for s in serving:
        count[roles.get(s.instance_id, BOTH)] = count.get(roles.get(s.instance_id, BOTH), 0) + 1
    allowed = [s for s in serving if roles.get(s.instance_id, BOTH) == BOTH or count[roles[s.instance_id]] > 1]
    return min(allowed, key=lambda s: (s.load.num_running, s.load.used_blocks, s.instance_id), default=None)


def plan_scaling(states: list[InstanceState], roles: dict[str, str], current: int, in_flight: bool,
                 cfg: AutoscaleConfig, now: float, memory: AutoscaleMemory
                 ) -> tuple[ScaleDecision | None, AutoscaleMemory]:
    """The change to make now, if any, and the memory to pass next time. `current`: the instances the
    deployment runs (or is bringing up); `in_flight`: a change is still being carried out."""
    avg = average_freeness(states)
    memory = replace(memory, low_since=_since(memory.low_since, avg < cfg.low_freeness, now),
                     high_since=_since(memory.high_since, avg > cfg.high_freeness, now))
    if in_flight:
        return None, memory
    if current < cfg.min_instances:
        return _decide(ScaleDecision(cfg.min_instances, None, f"{current} instances, below min_instances "
                                     f"{cfg.min_instances}"), now)
    if now - memory.last_change_at < cfg.cooldown_s:
        return None, memory
    if current > cfg.max_instances:
        victim = choose_victim(states, roles)
        if victim is not None:
            return _decide(ScaleDecision(current - 1, victim.instance_id, f"{current} instances, above "
                                         f"max_instances {cfg.max_instances}"), now)
        return None, memory
    if memory.low_since is not None and now - memory.low_since >= cfg.scale_up_delay_s and current < cfg.max_instances:
        return _decide(ScaleDecision(current + 1, None, f"average freeness {avg:.1f} < {cfg.low_freeness:g} for "
                                     f"{now - memory.low_since:.0f} s"), now)
    if memory.high_since is not None and now - memory.high_since >= cfg.scale_down_delay_s and \
            current > cfg.min_instances:
        victim = choose_victim(states, roles)
        if victim is not None:
            return _decide(ScaleDecision(current - 1, victim.instance_id,
                                         f"average freeness {avg:.1f} > {cfg.high_freeness:g} for "
                                         f"{now - memory.high_since:.0f} s; {victim.instance_id} has the fewest "
                                         f"running requests ({victim.load.num_running})"), now)
    return None, memory


def _since(since: float | None, holds: bool, now: float) -> float | None:
    """When a condition that holds now began (now, if it did not hold before); None when it does not hold."""
    return (now if since is None else since) if holds else None


def _decide(decision: ScaleDecision, now: float) -> tuple[ScaleDecision, AutoscaleMemory]:
    """A change is decided: both clocks start again after it (the load it changes is yet to be seen)."""
    return decision, AutoscaleMemory(last_change_at=now)
