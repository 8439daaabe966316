"""EP autoscaling: how many expert ranks an MoE instance should run, from its decode step time.

The signal is the instance's mean engine step time (`LoadSnapshot.step_time_ms`, what TPOT is made of while
it decodes). Above `high_step_ms` for `up_window_s` → one rank more; below `low_step_ms` for the longer
`down_window_s` → one fewer; in between resets both clocks, so a load inside the band never flaps. Only
while the instance has requests running (an idle instance's step time says nothing), one change at a time,
`cooldown_s` after each, always within `min_ep` .. `max_ep` (outside them, straight back inside).

A lost worker is a fault the instance repairs (its EP size below its target), never a reason to shrink: while
`ep_size != target` the policy decides nothing (Dynamo's rule: observed < current is a fault).

Pure: the caller passes the clock (`now`) and the memory it got back last time. Off unless `enabled`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EPAutoscaleConfig(BaseModel):
    """The `ep_autoscale:` section of a deployment's config; off unless `enabled`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(False, description="change MoE instances' EP size in the reconcile loop")
    high_step_ms: float = Field(50.0, gt=0, description="mean step time above which a rank is added ...")
    low_step_ms: float = Field(10.0, gt=0, description="... and below which one is removed")
    up_window_s: float = Field(10.0, ge=0, description="how long the step time must stay high before adding")
    down_window_s: float = Field(120.0, ge=0, description="how long it must stay low before removing")
    cooldown_s: float = Field(30.0, ge=0, description="no change for this long after the last one")
    min_ep: int = Field(1, ge=1)
    max_ep: int = Field(4, ge=1, le=64)
    interval_s: float = Field(1.0, gt=0, description="how often the policy looks")

    @model_validator(mode="after")
    def _sane(self) -> "EPAutoscaleConfig":
        if self.low_step_ms >= self.high_step_ms:
            raise ValueError(f"low_step_ms ({self.low_step_ms:g}) must be below high_step_ms "
                             f"({self.high_step_ms:g}), or the EP autoscaler would add and remove at once")
        if self.min_ep > self.max_ep:
            raise ValueError(f"min_ep ({self.min_ep}) exceeds max_ep ({self.max_ep})")
        return self


@dataclass(frozen=True)
class EPObservation:
    ep_size: int             # ranks serving now
    target: int              # the size asked for (differs while a lost worker is replaced or a scale runs)
    step_time_ms: float
    num_running: int
    scaling: bool = False    # a scale operation is in flight


@dataclass(frozen=True)
class EPMemory:
    high_since: float | None = None
    low_since: float | None = None
    last_change_at: float = -math.inf


@dataclass(frozen=True)
class EPDecision:
    ep_size: int
    reason: str


def decide_ep(obs: EPObservation, memory: EPMemory, cfg: EPAutoscaleConfig,
              now: float) -> tuple[EPDecision | None, EPMemory]:
    """The EP size to move to (None: stay), and the memory to pass next time."""
    if not cfg.enabled or obs.scaling or obs.ep_size != obs.target:
        return None, EPMemory(last_change_at=memory.last_change_at)
    if obs.ep_size < cfg.min_ep or obs.ep_size > cfg.max_ep:
        target = min(max(obs.ep_size, cfg.min_ep), cfg.max_ep)
        return (EPDecision(target, f"EP {obs.ep_size} is outside {cfg.min_ep}..{cfg.max_ep}"),
                EPMemory(last_change_at=now))
    if obs.num_running == 0:
        return None, EPMemory(last_change_at=memory.last_change_at)
    high_since = low_since = None
    if obs.step_time_ms > cfg.high_step_ms:
        high_since = memory.high_since if memory.high_since is not None else now
    elif obs.step_time_ms < cfg.low_step_ms:
        low_since = memory.low_since if memory.low_since is not None else now
    kept = EPMemory(high_since, low_since, memory.last_change_at)
    if now - memory.last_change_at < cfg.cooldown_s:
        return None, kept
    if high_since is not None and now - high_since >= cfg.up_window_s and obs.ep_size < cfg.max_ep:
        return (EPDecision(obs.ep_size + 1, f"step time {obs.step_time_ms:.1f} ms above {cfg.high_step_ms:g} ms "
                           f"for {now - high_since:.0f} s"), EPMemory(last_change_at=now))
    if low_since is not None and now - low_since >= cfg.down_window_s and obs.ep_size > cfg.min_ep:
        return (EPDecision(obs.ep_size - 1, f"step time {obs.step_time_ms:.1f} ms below {cfg.low_step_ms:g} ms "
                           f"for {now - low_since:.0f} s"), EPMemory(last_change_at=now))
    return None, kept
