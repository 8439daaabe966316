"""Scaling the number of instances, by the autoscaler (`orchestrator/policies/autoscale.py`, behind
`autoscale.enabled`) or by an operator (`tidal scale --instances N`), through the same steps:

- out: ask the cluster for room (a Ray autoscaler adds nodes), create the instances, wait until they serve (they
  show as starting, so they join dispatch only once ready);
- in: one instance at a time, the one with the fewest running requests — cordon it (no more dispatch), drain it
  by live migration (`drain_timeout_s`), let whatever could not move finish there (never aborted), then stop it.

One operation at a time. Its target is in the state store (`op/scale`), so a scheduler restarted in the middle
finishes it. Every decision and step is logged with the numbers behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from orchestrator.admin import Admin
from orchestrator.config import ServeConfig
from orchestrator.errors import failed_precondition, invalid_argument
from orchestrator.fleet import DEAD, Fleet
from orchestrator.intent import Intent
from orchestrator.policies.autoscale import AutoscaleMemory, choose_victim, plan_scaling
from rpc import ActorDead, BackgroundTasks

log = logging.getLogger(__name__)

EMPTY_POLL_S = 0.2           # how often a drained instance is checked for requests that still finish there
SETTLE_S = 1.0               # after it looks empty: what a frontend sent before the cordon landed has arrived


@dataclass(frozen=True)
class ScaleReport:
    previous: int
    target: int
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    not_moved: list[tuple[str, str]] = field(default_factory=list)     # (request id, why): it finished in place
    reason: str = ""


@dataclass(frozen=True)
class ScalingStatus:
    """What `tidal status` shows of scaling (pushed to frontends with the table)."""

    autoscale: bool
    target: int
    in_flight: str = ""                 # the operation being carried out, if any
    last_decision: str = ""
    last_decision_at: float = 0.0       # time.time()


class Scaling:
    def __init__(self, config: ServeConfig, fleet: Fleet, admin: Admin, intent: Intent,
                 push: Callable[[], Awaitable[None]], tasks: BackgroundTasks,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.fleet, self.admin, self.intent, self.push = config, fleet, admin, intent, push
        self.tasks, self.clock = tasks, clock
        self.memory = AutoscaleMemory()
        self._op: asyncio.Task | None = None
        self._doing = ""
        self._last = ("", 0.0)
        self._last_look = -float("inf")

    @property
    def in_flight(self) -> bool:
        return self._op is not None and not self._op.done()

    def current(self) -> int:
        """Instances the deployment runs or is bringing up (dead ones count: repair replaces them)."""
        return len(self.fleet.members)

    def status(self) -> ScalingStatus:
        return ScalingStatus(self.config.autoscale.enabled, self.current(), self._doing, *self._last)

    # ----- the two ways in -------------------------------------------------------------------------------------
    def autoscale(self) -> None:
        """The reconcile step: run the policy every `autoscale.interval_s` and start what it decides."""
        cfg = self.config.autoscale
        now = self.clock()
        if not cfg.enabled or now - self._last_look < cfg.interval_s:
            return
        self._last_look = now
        decision, self.memory = plan_scaling(self.fleet.states(), self.fleet.roles(), self.current(),
                                             self.in_flight, cfg, now, self.memory)
        if decision is not None:
            log.info("autoscale: %d -> %d instances: %s", self.current(), decision.target, decision.reason)
            self._start(decision.target, decision.reason, decision.remove)

    async def scale_to(self, target: int) -> ScaleReport:
        """An operator's `tidal scale --instances N`: the same steps, now; returns once done."""
        bound = self.config.autoscale.max_instances
        if not 1 <= target <= bound:
            raise invalid_argument(f"instances: {target} is out of range; give 1 to {bound} (autoscale."
                                   "max_instances)")
        if self.in_flight:
            raise failed_precondition(f"a scale operation is in flight ({self._doing}); retry once it is done")
        if target == self.current():
            return ScaleReport(target, target, reason="already at the target")
        return await self._start(target, f"operator asked for {target} instances")

    def resume(self, op: dict) -> None:
        """Finish the operation a previous scheduler left unfinished."""
        log.info("resuming the interrupted scale operation to %d instances (%s)", op["target"], op.get("reason"))
        self._start(op["target"], f"resumed: {op.get('reason', '')}", op.get("removing"), op.get("adding") or [])

    # ----- carrying it out -------------------------------------------------------------------------------------
    def _start(self, target: int, reason: str, remove: str | None = None,
               adding: list[str] | None = None) -> asyncio.Task:
        self._last = (reason, time.time())
        self._op = self.tasks.spawn(f"scale to {target}", self._run(target, reason, remove, adding))
        return self._op

    async def _run(self, target: int, reason: str, remove: str | None, adding: list[str] | None) -> ScaleReport:
        previous = self.current()
        added, removed, not_moved = [], [], []
        try:
            if target > previous or adding:
                added = await self._scale_out(target, reason, adding or [])
            while self.current() > target:
                victim = remove or self._victim()
                if victim is None:
                    log.warning("scale to %d: no instance may be removed (the last of its role)", target)
                    break
                remove = None
                not_moved += await self._scale_in(target, victim, reason)
                removed.append(victim)
        finally:
            self._doing = ""
            await self.intent.end_scale()
            await self.push()
        log.info("scale %d -> %d done: added %s, removed %s%s", previous, self.current(), added or "none",
                 removed or "none", f", {len(not_moved)} requests finished in place" if not_moved else "")
        return ScaleReport(previous, self.current(), added, removed, not_moved, reason)

    def _victim(self) -> str | None:
        victim = choose_victim(self.fleet.states(), self.fleet.roles())
        return victim.instance_id if victim else None

    async def _scale_out(self, target: int, reason: str, adding: list[str]) -> list[str]:
        ids = adding or self.fleet.next_ids(target - self.current())
        self._doing = f"adding {', '.join(ids)}"
        await self.intent.start_scale(target, ids, None, reason)
        self.fleet.factory.request_capacity(target)
        started = self.clock()
        results = await asyncio.gather(*(self.fleet.add(iid) for iid in ids), return_exceptions=True)
        for iid, r in zip(ids, results):
            if isinstance(r, BaseException):
                log.error("scale out: %s failed to start: %s", iid, r)       # repair retries a dead one
        await self.push()
        log.info("scale out: %s serving %.1f s after the decision", ", ".join(ids), self.clock() - started)
        return ids

    async def _scale_in(self, target: int, victim: str, reason: str) -> list[tuple[str, str]]:
        self._doing = f"removing {victim}"
        await self.intent.start_scale(target, [], victim, reason)
        m = self.fleet.members.get(victim)
        not_moved: list[tuple[str, str]] = []
        try:
            while m is not None and m.state != DEAD:
                report = await self.admin.drain(victim)       # cordons it, then moves its requests away
                not_moved += report.not_moved
                if report.remaining:
                    log.info("scale in: %d requests could not move off %s; they finish there first",
                             report.remaining, victim)
                while _holds_requests(await m.client.get_status()):
                    await asyncio.sleep(EMPTY_POLL_S)
                await asyncio.sleep(SETTLE_S)
                if not _holds_requests(await m.client.get_status()):
                    break                                     # still empty once late arrivals have landed
        except ActorDead:
            pass                                              # it died meanwhile: its streams failed over
        await self.fleet.remove(victim)
        await self.push()
        return not_moved


def _holds_requests(status) -> bool:
    """Whether an instance still has requests, or migrations in flight (an incoming one would land there)."""
    load = status.load
    return bool(status.num_requests or load.num_running or load.num_waiting or load.num_suspended
                or status.migrations_in or status.migrations_out)
