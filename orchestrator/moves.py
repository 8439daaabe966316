"""The migrations the scheduler starts: each one tracked until it ends (never awaited by the loop), the recent
records, the rebalance ledger the policy's cooldowns read, and the requests no move may be planned for."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import replace
from typing import Callable

from instance.limits import MOVED_REQUEST_MEMORY_S, RECENT_MIGRATIONS_PER_SCHEDULER
from migration.protocol import MigrationRecord, MigrationState
from orchestrator.fleet import Fleet
from orchestrator.metrics import ControlMetrics, migration_kind
from orchestrator.policies.ledger import MoveLedger
from orchestrator.policies.migration import MigrationPolicyConfig, PlannedMove
from orchestrator.policies.pd import PREFILL
from rpc import BackgroundTasks

log = logging.getLogger(__name__)


class Moves:
    def __init__(self, fleet: Fleet, policy: MigrationPolicyConfig, tasks: BackgroundTasks,
                 clock: Callable[[], float] = time.monotonic, metrics: ControlMetrics | None = None):
        self.fleet = fleet
        self.metrics = metrics if metrics is not None else ControlMetrics()
        self.tasks = tasks
        self.clock = clock
        self.ledger = MoveLedger(policy)
        self.in_flight: dict[str, asyncio.Task] = {}                # request id -> its migration
        self.recent: deque[MigrationRecord] = deque(maxlen=RECENT_MIGRATIONS_PER_SCHEDULER)
        self._left: dict[str, tuple[str, float]] = {}               # request id -> (source, clock()) of a commit

    def plan_rebalance(self) -> list[PlannedMove]:
        """Rebalancing among the instances that decode; prefill instances hand their requests over instead.
        Busy requests are left out before planning, so that they take none of the round's moves."""
        roles = self.fleet.roles()
        busy = self.busy()
        states = [replace(s, requests=tuple(r for r in s.requests if r.request_id not in busy))
                  for s in self.fleet.decode_states() if roles[s.instance_id] != PREFILL]
        return self.ledger.plan(states, self.clock())

    def launch(self, move: PlannedMove, handoff: bool = False) -> asyncio.Task:
        """Start a migration; the task gives its final record. A hand-over is part of serving a request, not
        rebalancing: it sets no cooldown."""
        log.info("migrate %s: %s", move.request_id, move.reason)
        if not handoff:
            self.ledger.record(move, self.clock())
        task = self.tasks.spawn(f"migrate {move.request_id}", self._run(move, handoff))
        self.in_flight[move.request_id] = task
        task.add_done_callback(lambda _: self.in_flight.pop(move.request_id, None))
        return task

    async def _run(self, move: PlannedMove, handoff: bool) -> MigrationRecord:
        mid = uuid.uuid4().hex[:12]
        src, dst = self.fleet.get(move.src).client, self.fleet.get(move.dst).client
        try:
            record = await src.migrate_out(move.request_id, dst, mid, handoff)
        except Exception as e:  # noqa: BLE001 - the source died or hung: report it, the failover path recovers
            record = MigrationRecord(mid, move.request_id, move.src, move.dst, MigrationState.ABORTED_SRC,
                                     reason=f"source unreachable: {type(e).__name__}", ended_at=time.time())
        if record.state is MigrationState.COMMITTED:
            self._left[move.request_id] = (move.src, self.clock())
        self.recent.append(record)
        self.metrics.migration_ended(migration_kind(move.reason, handoff), record)
        return record

    def busy(self) -> set[str]:
        """Requests not to plan a move for: in flight, or moved since their source's last status (which
        still lists them)."""
        busy = set(self.in_flight)
        now = self.clock()
        for rid, (src, at) in list(self._left.items()):
            m = self.fleet.members.get(src)
            if m is None or m.status_asked_at > at or now - at > MOVED_REQUEST_MEMORY_S:
                del self._left[rid]
            else:
                busy.add(rid)
        return busy
