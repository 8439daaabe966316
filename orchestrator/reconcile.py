"""The scheduler's reconcile loop, in numbered steps, each guarded and timed so one failing step does not stop
the others:

  1. observe    — take each instance's status poll, fence the silent and the dead, send the next polls;
  2. rebalance  — the migration policy (pure, orchestrator/policies/migration.py) over the observed states,
                  its moves started and tracked, never awaited;
  3. pd         — prefill/decode disaggregation (orchestrator/policies/pd.py): hand requests from prefill
                  instances to decode instances, send queued prompts back from decode instances, and (behind
                  --pd-adaptive) switch an instance's role;
  4. repair     — replace dead instances (--restart-dead-instances);
  5. autoscale  — the autoscaling policy (orchestrator/policies/autoscale.py), behind autoscale.enabled;
  6. checkpoint — write the intent the state store missed while it was unreachable (and, after a start without
                  the store, adopt what it holds once it answers);
  7. broadcast  — push the instance table to every registered frontend, which dispatches on it locally.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from orchestrator.config import ServeConfig
from orchestrator.fleet import Fleet
from orchestrator.intent import Intent
from orchestrator.metrics import ControlMetrics
from orchestrator.moves import Moves
from orchestrator.policies.pd import DECODE, PREFILL, HandoffConfig, adapt_roles, plan_handoffs, plan_prompt_returns
from orchestrator.registry import FrontendRegistry
from orchestrator.store import StoreError
from rpc import BackgroundTasks

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, config: ServeConfig, fleet: Fleet, moves: Moves, intent: Intent,
                 frontends: FrontendRegistry, set_role: Callable[[str, str], Awaitable[str]],
                 resume: Callable[[list[str], dict | None], None], tasks: BackgroundTasks,
                 clock: Callable[[], float] = time.monotonic, autoscale: Callable[[], None] = lambda: None,
                 metrics: ControlMetrics | None = None):
        self.config = config
        self.fleet, self.moves, self.intent, self.frontends = fleet, moves, intent, frontends
        self.set_role = set_role
        self.resume = resume
        self.tasks = tasks
        self.clock = clock
        self.handoff = HandoffConfig(max_per_source=config.migration.max_concurrent,
                                     max_per_destination=config.migration.max_concurrent,
                                     batch_slots=config.engine.max_num_seqs)
        self.step_timings_ms: dict[str, float] = {}
        self.metrics = metrics if metrics is not None else ControlMetrics()
        self._last_rebalance = -float("inf")
        self._last_role_change = -float("inf")
        self._flush: asyncio.Task | None = None
        self._stopping = False
        self.steps = (("observe", fleet.observe), ("rebalance", self.rebalance), ("pd", self.pd),
                      ("repair", fleet.repair), ("autoscale", autoscale), ("checkpoint", self.checkpoint),
                      ("broadcast", self.broadcast))

    async def run_forever(self) -> None:
        interval = self.config.load_interval_s
        while not self._stopping:
            started = time.perf_counter()
            self.run_once()
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))

    def stop(self) -> None:
        self._stopping = True

    def run_once(self) -> None:
        for name, step in self.steps:
            t0 = time.perf_counter()
            try:
                step()
            except Exception:
                log.exception("reconcile step %s failed", name)
            took = time.perf_counter() - t0
            self.step_timings_ms[name] = 1000 * took
            self.metrics.step_took(name, took)

    # ----- the steps -----------------------------------------------------------------------------------------
    def rebalance(self) -> None:
        now = self.clock()
        if not self.config.rebalance.auto or now - self._last_rebalance < self.config.rebalance.interval_s:
            return
        self._last_rebalance = now
        for move in self.moves.plan_rebalance():
            self.moves.launch(move)

    def pd(self) -> None:
        roles = self.fleet.roles()
        if PREFILL in roles.values() or DECODE in roles.values():
            open_ = [s for s in self.fleet.states() if s.accepting]
            prefill = [s for s in open_ if roles[s.instance_id] == PREFILL]
            decode = [s for s in open_ if roles[s.instance_id] != PREFILL]
            for move in plan_handoffs(prefill, decode, self.moves.busy(), self.handoff):
                self.moves.launch(move, handoff=True)
            takers = [s for s in open_ if roles[s.instance_id] != DECODE]
            if takers:
                for move in plan_prompt_returns([s for s in decode if roles[s.instance_id] == DECODE], takers,
                                                self.moves.busy(), self.handoff.headroom_blocks):
                    self.moves.launch(move)
        if self.config.pd.adaptive:
            now = self.clock()
            change = adapt_roles(self.fleet.states(), roles, self.config.pd, now, self._last_role_change)
            if change is not None:
                self._last_role_change = now
                log.info("adaptive roles: %s becomes %s: %s", change.instance_id, change.role, change.reason)
                self.tasks.spawn(f"set-role {change.instance_id}", self.set_role(change.instance_id, change.role))

    def checkpoint(self) -> None:
        if self._flush is not None and not self._flush.done():
            return
        if not self.fleet.intent_known:
            self._flush = self.tasks.spawn("adopt stored intent", self._adopt())
        elif self.intent.pending:
            self._flush = self.tasks.spawn("write intent", self.intent.flush())

    async def _adopt(self) -> None:
        try:
            drains = await self.fleet.adopt_stored_intent()
            scale = await self.intent.saved_scale()
        except StoreError:
            return                      # still down: the next round tries again
        self.resume(drains, scale)

    def broadcast(self) -> None:
        self.frontends.broadcast(self.fleet.views())

