"""The EP autoscaler in the reconcile loop: for each serving MoE instance, the pure rule
(orchestrator/policies/ep_autoscale.py) on its observed step time, and the scale it decides run through the
same admin command as `tidal scale INSTANCE --ep N`. Off unless `ep_autoscale.enabled`; never awaits."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable

from orchestrator.admin import Admin
from orchestrator.fleet import SERVING, Fleet
from orchestrator.policies.ep_autoscale import EPAutoscaleConfig, EPMemory, EPObservation, decide_ep
from rpc import BackgroundTasks

log = logging.getLogger(__name__)


class ExpertAutoscaler:
    def __init__(self, config: EPAutoscaleConfig, fleet: Fleet, admin: Admin, tasks: BackgroundTasks,
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.fleet, self.admin, self.tasks, self.clock = config, fleet, admin, tasks, clock
        self.memory: dict[str, EPMemory] = {}
        self.running: dict[str, asyncio.Task] = {}
        self._last = -math.inf

    def step(self) -> None:
        now = self.clock()
        if not self.config.enabled or now - self._last < self.config.interval_s:
            return
        self._last = now
        for m in self.fleet.members.values():
            iid, status = m.client.instance_id, m.status
            experts = getattr(status, "experts", None)
            if m.state != SERVING or experts is None:
                continue
            task = self.running.get(iid)
            if task is not None and not task.done():
                continue
            cfg = self.config.model_copy(update=dict(max_ep=min(self.config.max_ep, experts.max_size)))
            obs = EPObservation(experts.ep_size, experts.target, status.load.step_time_ms, status.load.num_running,
                                bool(experts.scaling))
            decision, self.memory[iid] = decide_ep(obs, self.memory.get(iid, EPMemory()), cfg, now)
            if decision is not None:
                log.info("EP autoscale %s: EP %d -> %d: %s", iid, experts.ep_size, decision.ep_size, decision.reason)
                self.running[iid] = self.tasks.spawn(f"EP autoscale {iid}",
                                                     self.admin.scale_experts(iid, decision.ep_size))
