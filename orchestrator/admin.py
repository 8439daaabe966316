"""Operators' commands: drain, undrain, rebalance, migrate one request, set a role, list migrations, scale an
MoE instance's expert parallelism.

They run beside the reconcile loop, over the same fleet and migrations, and plan with the same pure policies.
A command whose effect changes dispatch (drain, undrain, set-role) stores the new intent first and returns
once every frontend has the new table. Errors an operator can cause are `AdminError`s with the gRPC status
they map to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from instance.limits import DRAIN_RETRIES
from migration.protocol import MigrationRecord, MigrationState
from orchestrator.config import ServeConfig
from orchestrator.errors import AdminError, failed_precondition, not_found
from orchestrator.fleet import DEAD, DRAINING, SERVING, Fleet, Member
from orchestrator.intent import Intent
from orchestrator.moves import Moves
from orchestrator.policies.migration import InstanceState, PlannedMove, plan_drain
from orchestrator.policies.pd import check_role
from orchestrator.registry import FrontendRegistry
from rpc import Rejected

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.2         # a drain with nothing movable looks again this often
IN_FLIGHT_POLL_S = 0.05    # ... and one waiting for its migrations in flight


@dataclass(frozen=True)
class DrainReport:
    instance_id: str
    moved: list[MigrationRecord]
    not_moved: list[tuple[str, str]]     # (request id, why)
    remaining: int


class Admin:
    def __init__(self, config: ServeConfig, fleet: Fleet, moves: Moves, intent: Intent,
                 frontends: FrontendRegistry, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.fleet, self.moves, self.intent, self.frontends = fleet, moves, intent, frontends
        self.clock = clock

    async def _push_now(self) -> None:
        await self.frontends.push_now(self.fleet.views())

    # ----- roles and dispatch --------------------------------------------------------------------------------
    async def set_role(self, instance_id: str, role: str) -> str:
        """Give the instance a new role; returns the previous one. What no longer fits moves in the next
        rounds of the pd step (decoding requests leave a prefill instance, queued prompts a decode one)."""
        check_role(role)
        m = self.fleet.get(instance_id)
        if m.state == DEAD:
            raise failed_precondition(f"{instance_id} is dead; it has no role to change")
        previous, m.role = m.role, role
        if previous != role:
            log.info("set-role %s: %s -> %s", instance_id, previous, role)
            await self.fleet.save(m)
            await self._push_now()
        return previous

    async def undrain(self, instance_id: str) -> str:
        m = self.fleet.get(instance_id)
        if m.state == DEAD:
            raise failed_precondition(f"{instance_id} is dead; it cannot serve again")
        if m.state == DRAINING:
            m.state = SERVING
            log.info("undrain %s: dispatching to it again", instance_id)
            await self.fleet.save(m)
            await self._push_now()
        return m.state

    # ----- moves ---------------------------------------------------------------------------------------------
    async def rebalance(self) -> list[MigrationRecord]:
        moves = self.moves.plan_rebalance()
        if not moves:
            log.info("rebalance: nothing to move")
        return list(await asyncio.gather(*(self.moves.launch(m) for m in moves)))

    async def migrate(self, request_id: str, to_instance: str | None = None) -> MigrationRecord:
        src, info = await self._locate(request_id)
        if to_instance:
            dst = self.fleet.get(to_instance)
            if dst is src:
                raise failed_precondition(f"request {request_id} is already on {to_instance}")
            if dst.state != SERVING:
                raise failed_precondition(f"{to_instance} is {dst.state}; only a serving instance takes requests")
        else:
            states = [s for s in self.fleet.decode_states() if s.instance_id != src.instance_id]
            moves, cannot = plan_drain(InstanceState(src.instance_id, src.status.load, (info,), accepting=False),
                                       states, self.config.rebalance)
            if not moves:
                reason = cannot[0][1] if cannot else "no other serving instance"
                raise failed_precondition(f"request {request_id} cannot move: {reason}")
            dst = self.fleet.get(moves[0].dst)
        if request_id in self.moves.in_flight:
            raise failed_precondition(f"request {request_id} is already being migrated")
        kinds = (src.info.backend if src.info else None, dst.info.backend if dst.info else None)
        if None not in kinds and kinds[0] != kinds[1]:
            raise failed_precondition(f"request {request_id} is on {src.instance_id} (backend {kinds[0]}) and "
                                      f"{dst.instance_id} runs backend {kinds[1]}: KV blocks move only between "
                                      "instances of one backend")
        log.info("migrate %s: operator asked, %s -> %s", request_id, src.instance_id, dst.instance_id)
        return await self.moves.launch(PlannedMove(request_id, src.instance_id, dst.instance_id, "operator request"))

    async def _locate(self, request_id: str) -> tuple[Member, Any]:
        """The live instance holding request_id (asked directly, not from the last poll) and its info."""
        live = self.fleet.live()
        infos = await asyncio.gather(*(m.client.request_info(request_id) for m in live), return_exceptions=True)
        for m, info in zip(live, infos):
            if info is not None and not isinstance(info, BaseException):
                return m, info
        raise not_found(f"request_id: no running request {request_id!r}")

    async def drain(self, instance_id: str) -> DrainReport:
        """Stop dispatching to the instance and move its requests away (the reconcile loop keeps offering
        what is left, as a draining source, after the command returns)."""
        m = self.fleet.get(instance_id)
        if m.state == DEAD:
            raise failed_precondition(f"{instance_id} is dead; there is nothing to drain")
        if m.state != DRAINING:
            m.state = DRAINING
            log.info("drain %s: no longer dispatched to; moving its requests away", instance_id)
            await self.fleet.save(m)
            await self._push_now()
        await self.intent.start_drain(instance_id)
        moved: list[MigrationRecord] = []
        failures: dict[str, list[str]] = {}
        deadline = self.clock() + self.config.drain_timeout_s
        remaining: tuple = ()
        while self.clock() < deadline:
            m.status = await m.client.get_status()
            remaining = m.status.requests
            movable = [r for r in remaining if len(failures.get(r.request_id, ())) < DRAIN_RETRIES
                       and r.request_id not in self.moves.in_flight]
            if not remaining or not movable:
                if remaining and any(r.request_id in self.moves.in_flight for r in remaining):
                    await asyncio.sleep(IN_FLIGHT_POLL_S)       # wait for migrations in flight
                    continue
                break
            others = [s for s in self.fleet.decode_states() if s.instance_id != instance_id]
            me = InstanceState(instance_id, m.status.load, tuple(movable), accepting=False)
            moves, cannot = plan_drain(me, others, self.config.rebalance)
            for rid, reason in cannot:
                failures.setdefault(rid, []).append(reason)
            if not moves:
                await asyncio.sleep(DRAIN_POLL_S)
                continue
            records = await asyncio.gather(*(self.moves.launch(mv)
                                             for mv in moves[:self.config.migration.max_concurrent]))
            for rec in records:
                if rec.state is MigrationState.COMMITTED:
                    moved.append(rec)
                elif rec.state is not MigrationState.ENDED:
                    failures.setdefault(rec.request_id, []).append(rec.reason or rec.state.value)
        left = {r.request_id for r in remaining}
        not_moved = [(rid, reasons[-1]) for rid, reasons in failures.items() if rid in left]
        await self.intent.end_drain(instance_id)
        log.info("drain %s: %d moved, %d could not move, %d remaining", instance_id, len(moved), len(not_moved),
                 len(left))
        return DrainReport(instance_id, moved, not_moved, len(left))

    # ----- expert parallelism -------------------------------------------------------------------------------
    async def scale_experts(self, instance_id: str, ep_size: int, dry_run: bool = False):
        """Change an MoE instance's EP size while it serves; the instance plans, copies and switches
        (instance/ep/scaler.py). Its refusals keep their status (INVALID_ARGUMENT, FAILED_PRECONDITION)."""
        m = self.fleet.get(instance_id)
        if m.state == DEAD:
            raise failed_precondition(f"{instance_id} is dead; it has no experts to scale")
        log.info("scale %s: EP size %d%s asked", instance_id, ep_size, " (dry run)" if dry_run else "")
        try:
            report = await m.client.scale_experts(ep_size, dry_run, timeout_s=self.config.deadlines.startup_s)
        except Rejected as e:
            code = getattr(e.cause, "code", None)
            if isinstance(code, str):
                raise AdminError(code, getattr(e.cause, "message", str(e.cause))) from None
            raise
        log.info("scale %s: EP %d -> %d %s", instance_id, report.previous, report.ep_size, report.result)
        return report

    async def list_migrations(self) -> tuple[list[MigrationRecord], list[MigrationRecord]]:
        live = self.fleet.live()
        per = await asyncio.gather(*(m.client.list_migrations() for m in live), return_exceptions=True)
        in_flight = [r for recs in per if not isinstance(recs, BaseException) for r in recs if not r.state.done]
        return in_flight, list(self.moves.recent)
