"""GlobalScheduler: the one named, detached Ray actor that knows every instance.

It creates the instances with their Ray resources, then runs one reconcile loop in numbered steps, each
guarded and timed so one failing step does not stop the others:

  1. observe   — poll each instance's status (one outstanding call per instance, never blocking the loop);
  2. decide    — the migration policy (pure, orchestrator/policies/migration.py) over the snapshots;
  3. act       — start the planned migrations (tracked, never awaited by the loop);
  4. pd        — prefill/decode disaggregation (orchestrator/policies/pd.py): hand requests from prefill
                 instances to decode instances, send queued prompts back from decode instances, and (behind
                 --pd-adaptive) switch an instance's role;
  5. repair    — replace dead instances (--restart-dead-instances);
  6. broadcast — push the instance table to every registered frontend, which dispatches on it locally.

Admin operations (drain, undrain, rebalance, migrate) run beside the loop and use the same policies.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from instance.actor import InstanceActor
from instance.messages import InstanceInfo, InstanceStatus
from migration.protocol import MigrationRecord, MigrationState
from orchestrator.config import ServeConfig
from orchestrator.errors import failed_precondition, not_found
from orchestrator.handles import InstanceHandle
from orchestrator.policies.migration import (InstanceState, MigrationPolicyConfig, PlannedMove, plan_drain,
                                             plan_migrations, recent_moves)
from orchestrator.policies.pd import (BOTH, DECODE, PREFILL, AdaptiveConfig, HandoffConfig, adapt_roles,
                                      check_role, plan_handoffs, plan_prompt_returns, takes_decodes)
from orchestrator.store import StateStore, open_store

log = logging.getLogger(__name__)

STARTING, SERVING, DRAINING, DEAD = "starting", "serving", "draining", "dead"
RECENT_MIGRATIONS = 200
DRAIN_RETRIES = 3


@dataclass(frozen=True)
class InstanceView:
    """One row of the instance table as frontends and admin commands see it."""

    instance_id: str
    actor: Any
    state: str
    info: InstanceInfo | None
    status: InstanceStatus | None
    observed_at: float              # time.time() of the status, 0 if none yet
    role: str = BOTH                # prefill | decode | both


@dataclass(frozen=True)
class DrainReport:
    instance_id: str
    moved: list[MigrationRecord]
    not_moved: list[tuple[str, str]]     # (request id, why)
    remaining: int


@dataclass
class _Instance:
    handle: InstanceHandle
    role: str = BOTH
    state: str = STARTING
    info: InstanceInfo | None = None
    status: InstanceStatus | None = None
    observed_at: float = 0.0
    poll: asyncio.Task | None = None
    poll_started: float = 0.0
    poll_sent_at: float = 0.0       # time.time() the outstanding poll was sent
    status_asked_at: float = 0.0    # time.time() the poll that returned `status` was sent
    failures: int = 0
    replacing: asyncio.Task | None = None

    @property
    def instance_id(self) -> str:
        return self.handle.instance_id

    def view(self) -> InstanceView:
        return InstanceView(self.instance_id, self.handle.actor, self.state, self.info, self.status,
                            self.observed_at, self.role)

    def policy_state(self) -> InstanceState | None:
        if self.status is None or self.state == DEAD:
            return None
        return InstanceState(self.instance_id, self.status.load, self.status.requests,
                             accepting=self.state == SERVING, migrations_out=self.status.migrations_out,
                             migrations_in=self.status.migrations_in)


@dataclass
class _Frontend:
    actor: Any
    push: asyncio.Task | None = None
    failures: int = field(default=0)


class GlobalScheduler:
    def __init__(self, config: dict):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = ServeConfig(**config)
        cfg = self.config
        self.policy = MigrationPolicyConfig(source_freeness=cfg.source_freeness, target_freeness=cfg.target_freeness,
                                            choose=cfg.migrate_choose,
                                            request_cooldown_s=cfg.migrate_request_cooldown_s,
                                            max_waiting_offers=cfg.migrate_waiting_offers)
        self.instances: dict[str, _Instance] = {}
        self.frontends: dict[str, _Frontend] = {}
        self.migrating: dict[str, asyncio.Task] = {}             # request id -> migration task
        self.recent: deque[MigrationRecord] = deque(maxlen=RECENT_MIGRATIONS)
        self.last_move_at: dict[str, float] = {}
        self.request_moved_at: dict[str, float] = {}      # request id -> when rebalancing last moved it
        self._last_rebalance = 0.0
        self.handoff = HandoffConfig(max_per_source=cfg.migration.max_concurrent,
                                     max_per_destination=cfg.migration.max_concurrent,
                                     batch_slots=cfg.engine.max_num_seqs)
        self.adaptive = AdaptiveConfig(queue_high=cfg.pd_queue_high, tpot_target_ms=cfg.pd_tpot_target_ms,
                                       decode_freeness_low=cfg.source_freeness, cooldown_s=cfg.pd_cooldown_s)
        self._last_role_change = -float("inf")
        self._left: dict[str, tuple[str, float]] = {}     # request id -> (source, time.time()) of a committed move
        self.store: StateStore = open_store(cfg.state_store, cfg.deployment)
        self._start_lock = asyncio.Lock()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self.step_timings_ms: dict[str, float] = {}

    # ----- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> list[InstanceView]:
        """Create the instances (or, after a restart, re-find them by name from the stored target state), wait
        until they serve, start the reconcile loop. Idempotent."""
        async with self._start_lock:
            if self._loop_task is not None:
                return self.list_instances()
            cfg = self.config
            saved = await asyncio.to_thread(self.store.scan, "instance/")
            if saved and await self._recover(saved):
                log.info("recovered %d instances from the state store (%s)", len(self.instances), self.store.url)
            else:
                if saved:
                    log.warning("stored state names %d instances but none is alive: starting afresh", len(saved))
                    await asyncio.to_thread(self._forget_state)
                for i in range(cfg.instances):
                    iid = f"instance-{i}"
                    self.instances[iid] = _Instance(InstanceHandle(iid, self._create_actor(iid), cfg.call_timeout_s),
                                                    role=cfg.initial_role(i))
                roles = [inst.role for inst in self.instances.values()]
                log.info("starting %d instances of %s%s", cfg.instances, cfg.engine.model,
                         f" ({roles.count(PREFILL)} prefill, {roles.count(DECODE)} decode, {roles.count(BOTH)} both)"
                         if set(roles) != {BOTH} else "")
                await asyncio.gather(*(self._start_instance(inst) for inst in self.instances.values()))
            for inst in self.instances.values():
                await self._save(inst)
            self._loop_task = asyncio.get_running_loop().create_task(self._reconcile_forever())
            for key in await asyncio.to_thread(self.store.scan, "op/drain/"):
                log.info("resuming the interrupted drain of %s", key.split("/")[-1])
                asyncio.ensure_future(self.drain(key.split("/")[-1]))
            return self.list_instances()

    async def _recover(self, saved: dict[str, dict]) -> bool:
        """Re-find the stored instances by actor name. True if at least one is alive."""
        alive = 0
        for key, rec in sorted(saved.items()):
            iid = rec["instance_id"]
            try:
                actor = ray.get_actor(self.config.actor_name(iid), namespace=self.config.namespace)
            except ValueError:
                actor = None
            inst = _Instance(InstanceHandle(iid, actor, self.config.call_timeout_s), role=rec.get("role", BOTH))
            self.instances[iid] = inst
            if actor is None:
                inst.state = DEAD
                log.warning("%s is gone since the scheduler last ran", iid)
                continue
            try:
                await self._start_instance(inst)
                inst.state = rec.get("state", SERVING)
                alive += 1
            except Exception as e:  # noqa: BLE001 - counted as dead; repair may replace it
                inst.state = DEAD
                log.warning("%s did not answer after the scheduler restarted: %s", iid, e)
        return alive > 0

    async def _save(self, inst: _Instance) -> None:
        """Persist an instance's target state (intent only: it exists, serving or draining, and its role)."""
        intent = DRAINING if inst.state == DRAINING else SERVING
        await asyncio.to_thread(self.store.put, f"instance/{inst.instance_id}",
                                {"instance_id": inst.instance_id, "state": intent, "role": inst.role})

    def _forget_state(self) -> None:
        for key in self.store.scan(""):
            self.store.delete(key)

    def _create_actor(self, iid: str):
        cfg = self.config
        return ray.remote(InstanceActor).options(
            name=cfg.actor_name(iid), namespace=cfg.namespace, lifetime="detached",
            num_cpus=cfg.num_cpus_per_instance, num_gpus=cfg.gpus_per_instance,
            scheduling_strategy="SPREAD", max_restarts=0, max_concurrency=1000,
        ).remote(iid, cfg.engine.model_dump(), max(1, int(cfg.num_cpus_per_instance)), cfg.migration.model_dump())

    async def _start_instance(self, inst: _Instance) -> None:
        try:
            inst.info = await inst.handle.start(timeout_s=self.config.startup_timeout_s)
        except Exception as e:
            raise RuntimeError(f"{inst.instance_id} failed to start: {e}") from e
        inst.status = await inst.handle.get_status()
        inst.observed_at = time.time()
        inst.state = SERVING
        log.info("%s serving on node %s (%s)", inst.instance_id, inst.info.node_ip, inst.info.node_id[:12])

    async def shutdown(self) -> None:
        """Stop the loop, kill the instances this scheduler created and clear its stored state."""
        self._stopping = True
        try:
            await asyncio.to_thread(self._forget_state)
        except Exception as e:  # noqa: BLE001 - the store may be down; the instances still go
            log.warning("clearing the state store failed: %r", e)
        for inst in self.instances.values():
            try:
                inst.handle.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
            inst.state = DEAD
        log.info("scheduler shut down; %d instances stopped", len(self.instances))

    async def register_frontend(self, name: str, actor: Any) -> list[InstanceView]:
        """Frontends register at start and again whenever the scheduler went quiet (it may have restarted)."""
        await self.start()
        if name not in self.frontends:
            log.info("frontend %s registered", name)
        self.frontends[name] = _Frontend(actor)
        return self.list_instances()

    def list_instances(self) -> list[InstanceView]:
        return [inst.view() for inst in self.instances.values()]

    async def get_timings(self) -> dict[str, float]:
        return dict(self.step_timings_ms)

    # ----- the reconcile loop ----------------------------------------------------------------------------------
    async def _reconcile_forever(self) -> None:
        interval = self.config.load_interval_s
        steps = (("observe", self._observe), ("decide+act", self._auto_rebalance), ("pd", self._pd_step),
                 ("repair", self._repair), ("broadcast", self._broadcast))
        while not self._stopping:
            started = time.perf_counter()
            for name, step in steps:
                t0 = time.perf_counter()
                try:
                    step()
                except Exception:
                    log.exception("reconcile step %s failed", name)
                self.step_timings_ms[name] = 1000 * (time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))

    def _observe(self) -> None:
        now = time.monotonic()
        for inst in self.instances.values():
            if inst.state in (DEAD, STARTING):
                continue
            if inst.poll is not None and inst.poll.done():
                self._take_poll(inst)
            elif inst.poll is not None and now - inst.poll_started > self.config.instance_timeout_s:
                inst.poll.cancel()
                inst.poll = None
                self._declare_dead(inst, f"no status report for {self.config.instance_timeout_s:.1f} s")
            if inst.poll is None and inst.state != DEAD:
                inst.poll = asyncio.ensure_future(inst.handle.get_status())
                inst.poll_started, inst.poll_sent_at = now, time.time()

    def _declare_dead(self, inst: _Instance, why: str) -> None:
        """Stop dispatching to it; frontends resume its requests elsewhere. Killed to be sure it stays quiet."""
        inst.state = DEAD
        log.error("%s is dead: %s", inst.instance_id, why)
        try:
            inst.handle.kill()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _repair(self) -> None:
        if not self.config.restart_dead_instances:
            return
        for inst in self.instances.values():
            if inst.state == DEAD and (inst.replacing is None or inst.replacing.done()):
                inst.replacing = asyncio.ensure_future(self._replace(inst))

    async def _replace(self, inst: _Instance) -> None:
        iid = inst.instance_id
        await asyncio.sleep(1.0)          # let Ray release the dead actor's name
        log.info("restarting %s", iid)
        fresh = _Instance(InstanceHandle(iid, self._create_actor(iid), self.config.call_timeout_s), role=inst.role)
        self.instances[iid] = fresh
        try:
            await self._start_instance(fresh)
            await self._save(fresh)
        except Exception as e:  # noqa: BLE001 - try again on the next round
            log.error("restarting %s failed: %s", iid, e)
            fresh.state = DEAD

    def _take_poll(self, inst: _Instance) -> None:
        poll, inst.poll = inst.poll, None
        err = poll.exception()
        if err is None:
            inst.status = poll.result()
            inst.observed_at, inst.status_asked_at = time.time(), inst.poll_sent_at
            inst.failures = 0
            return
        inst.failures += 1
        if isinstance(err, ray.exceptions.RayActorError):
            self._declare_dead(inst, f"{type(err).__name__}")
        else:
            log.warning("%s: status poll failed (%d in a row): %r", inst.instance_id, inst.failures, err)

    def _auto_rebalance(self) -> None:
        now = time.monotonic()
        if not self.config.auto_migrate or now - self._last_rebalance < self.config.rebalance_interval_s:
            return
        self._last_rebalance = now
        for move in self._plan(now):
            self._launch(move)

    def _plan(self, now: float) -> list[PlannedMove]:
        """Rebalancing among the instances that decode; prefill instances hand their requests over instead."""
        roles = self._role_map()
        busy = self._busy()       # left out before planning, so that they take none of the round's moves
        states = [replace(s, requests=tuple(r for r in s.requests if r.request_id not in busy))
                  for s in self._decode_states() if roles[s.instance_id] != PREFILL]
        self.request_moved_at = recent_moves(self.request_moved_at, now, self.policy)
        return plan_migrations(states, self.policy, now, self.last_move_at, self.request_moved_at)

    # ----- prefill/decode disaggregation ---------------------------------------------------------------------
    def _role_map(self) -> dict[str, str]:
        return {iid: inst.role for iid, inst in self.instances.items()}

    def _states(self) -> list[InstanceState]:
        return [s for s in (inst.policy_state() for inst in self.instances.values()) if s is not None]

    def _decode_states(self) -> list[InstanceState]:
        """Policy states of the live instances requests may decode on (decode and both), or of every live
        instance if none of those serves: then prefill instances decode too."""
        states = self._states()
        serving = [s.instance_id for s in states if s.accepting]
        pool = set(takes_decodes(self._role_map(), serving))
        return [s for s in states if s.instance_id in pool] if pool else states

    def _pd_step(self) -> None:
        roles = self._role_map()
        if PREFILL in roles.values() or DECODE in roles.values():
            open_ = [s for s in self._states() if s.accepting]
            prefill = [s for s in open_ if roles[s.instance_id] == PREFILL]
            decode = [s for s in open_ if roles[s.instance_id] != PREFILL]
            for move in plan_handoffs(prefill, decode, self._busy(), self.handoff):
                self._launch(move, handoff=True)
            takers = [s for s in open_ if roles[s.instance_id] != DECODE]
            if takers:
                for move in plan_prompt_returns([s for s in decode if roles[s.instance_id] == DECODE], takers,
                                                self._busy(), self.handoff.headroom_blocks):
                    self._launch(move)
        if self.config.pd_adaptive:
            change = adapt_roles(self._states(), roles, self.adaptive, time.monotonic(), self._last_role_change)
            if change is not None:
                self._last_role_change = time.monotonic()
                log.info("adaptive roles: %s becomes %s: %s", change.instance_id, change.role, change.reason)
                asyncio.ensure_future(self.set_role(change.instance_id, change.role))

    def _busy(self) -> set[str]:
        """Requests not to plan a move for: in flight, or moved since their source's last status (which
        still lists them)."""
        busy = set(self.migrating)
        for rid, (src, at) in list(self._left.items()):
            inst = self.instances.get(src)
            if inst is None or inst.status_asked_at > at or time.time() - at > 30:
                del self._left[rid]
            else:
                busy.add(rid)
        return busy

    async def set_role(self, instance_id: str, role: str) -> str:
        """Give the instance a new role; returns the previous one. What no longer fits moves in the next
        rounds of the pd step (decoding requests leave a prefill instance, queued prompts a decode one)."""
        check_role(role)
        inst = self._instance(instance_id)
        if inst.state == DEAD:
            raise failed_precondition(f"{instance_id} is dead; it has no role to change")
        previous, inst.role = inst.role, role
        if previous != role:
            log.info("set-role %s: %s -> %s", instance_id, previous, role)
            await self._save(inst)
            await self._push_now()
        return previous

    def _broadcast(self) -> None:
        views = self.list_instances()
        for name, fe in list(self.frontends.items()):
            if fe.push is not None and not fe.push.done():
                continue            # the last push has not landed yet: do not pile up
            if fe.push is not None and fe.push.exception() is not None:
                fe.failures += 1
                if isinstance(fe.push.exception(), ray.exceptions.RayActorError):
                    log.warning("frontend %s is gone; unregistering it", name)
                    del self.frontends[name]
                    continue
            fe.push = asyncio.ensure_future(
                asyncio.wait_for(fe.actor.update_instances.remote(views), self.config.call_timeout_s))

    async def _push_now(self) -> None:
        """Push the table to every frontend and wait for it to land, so a command's effect on dispatch is in
        place when the command returns."""
        views = self.list_instances()
        fes = list(self.frontends.values())
        results = await asyncio.gather(*(asyncio.wait_for(fe.actor.update_instances.remote(views),
                                                          self.config.call_timeout_s) for fe in fes),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("pushing the instance table to a frontend failed: %r", r)

    # ----- migrations ------------------------------------------------------------------------------------------
    def _launch(self, move: PlannedMove, handoff: bool = False) -> asyncio.Task:
        log.info("migrate %s: %s", move.request_id, move.reason)
        if not handoff:         # hand-overs are part of serving a request, not rebalancing: no cooldown
            self.last_move_at[move.src] = self.last_move_at[move.dst] = time.monotonic()
            self.request_moved_at[move.request_id] = time.monotonic()
        task = asyncio.ensure_future(self._run_migration(move.request_id, move.src, move.dst, handoff))
        self.migrating[move.request_id] = task
        task.add_done_callback(lambda _: self.migrating.pop(move.request_id, None))
        return task

    async def _run_migration(self, request_id: str, src: str, dst: str, handoff: bool = False) -> MigrationRecord:
        mid = uuid.uuid4().hex[:12]
        cfg = self.config.migration
        timeout = cfg.call_timeout_s * (cfg.max_stages + 4) + (cfg.handoff_prefill_timeout_s if handoff else 0)
        try:
            record = await asyncio.wait_for(
                self.instances[src].handle.actor.migrate_out.remote(request_id, dst, self.instances[dst].handle.actor,
                                                                    mid, handoff), timeout)
        except Exception as e:  # noqa: BLE001 - the source died or hung: report it, the failover path recovers
            record = MigrationRecord(mid, request_id, src, dst, MigrationState.ABORTED_SRC,
                                     reason=f"source unreachable: {type(e).__name__}", ended_at=time.time())
        if record.state is MigrationState.COMMITTED:
            self._left[request_id] = (src, time.time())
        self.recent.append(record)
        return record

    def _instance(self, instance_id: str) -> _Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise not_found(f"instance_id: no instance {instance_id!r}; `tidal status` lists them")
        return inst

    async def _locate(self, request_id: str) -> tuple[_Instance, Any]:
        """The live instance holding request_id (asked directly, not from the last poll) and its info."""
        live = [i for i in self.instances.values() if i.state != DEAD]
        infos = await asyncio.gather(*(asyncio.wait_for(i.handle.actor.request_info.remote(request_id),
                                                        self.config.call_timeout_s) for i in live),
                                     return_exceptions=True)
        for inst, info in zip(live, infos):
            if info is not None and not isinstance(info, BaseException):
                return inst, info
        raise not_found(f"request_id: no running request {request_id!r}")

    async def migrate(self, request_id: str, to_instance: str | None = None) -> MigrationRecord:
        src, info = await self._locate(request_id)
        if to_instance:
            dst = self._instance(to_instance)
            if dst is src:
                raise failed_precondition(f"request {request_id} is already on {to_instance}")
            if dst.state != SERVING:
                raise failed_precondition(f"{to_instance} is {dst.state}; only a serving instance takes requests")
        else:
            states = [s for s in self._decode_states() if s.instance_id != src.instance_id]
            moves, cannot = plan_drain(
                InstanceState(src.instance_id, src.status.load, (info,), accepting=False), states, self.policy)
            if not moves:
                reason = cannot[0][1] if cannot else "no other serving instance"
                raise failed_precondition(f"request {request_id} cannot move: {reason}")
            dst = self.instances[moves[0].dst]
        if request_id in self.migrating:
            raise failed_precondition(f"request {request_id} is already being migrated")
        log.info("migrate %s: operator asked, %s -> %s", request_id, src.instance_id, dst.instance_id)
        return await self._launch(PlannedMove(request_id, src.instance_id, dst.instance_id, "operator request"))

    async def rebalance(self) -> list[MigrationRecord]:
        moves = self._plan(time.monotonic())
        if not moves:
            log.info("rebalance: nothing to move")
        return list(await asyncio.gather(*(self._launch(m) for m in moves)))

    async def drain(self, instance_id: str) -> DrainReport:
        inst = self._instance(instance_id)
        if inst.state == DEAD:
            raise failed_precondition(f"{instance_id} is dead; there is nothing to drain")
        if inst.state != DRAINING:
            inst.state = DRAINING
            log.info("drain %s: no longer dispatched to; moving its requests away", instance_id)
            await self._save(inst)
            await self._push_now()
        await asyncio.to_thread(self.store.put, f"op/drain/{instance_id}", {"instance_id": instance_id,
                                                                            "started_at": time.time()})
        moved: list[MigrationRecord] = []
        failures: dict[str, list[str]] = {}
        deadline = time.monotonic() + self.config.drain_timeout_s
        remaining: tuple = ()
        while time.monotonic() < deadline:
            inst.status = await inst.handle.get_status()
            remaining = inst.status.requests
            movable = [r for r in remaining if len(failures.get(r.request_id, ())) < DRAIN_RETRIES
                       and r.request_id not in self.migrating]
            if not remaining or not movable:
                if remaining and any(r.request_id in self.migrating for r in remaining):
                    await asyncio.sleep(0.05)       # wait for migrations in flight
                    continue
                break
            others = [s for s in self._decode_states() if s.instance_id != instance_id]
            me = InstanceState(instance_id, inst.status.load, tuple(movable), accepting=False)
            moves, cannot = plan_drain(me, others, self.policy)
            for rid, reason in cannot:
                failures.setdefault(rid, []).append(reason)
            if not moves:
                await asyncio.sleep(0.2)
                continue
            records = await asyncio.gather(*(self._launch(m) for m in moves[:self.config.migration.max_concurrent]))
            for rec in records:
                if rec.state is MigrationState.COMMITTED:
                    moved.append(rec)
                elif rec.state is not MigrationState.ENDED:
                    failures.setdefault(rec.request_id, []).append(rec.reason or rec.state.value)
        left = {r.request_id for r in remaining}
        not_moved = [(rid, reasons[-1]) for rid, reasons in failures.items() if rid in left]
        await asyncio.to_thread(self.store.delete, f"op/drain/{instance_id}")
        log.info("drain %s: %d moved, %d could not move, %d remaining", instance_id, len(moved), len(not_moved),
                 len(left))
        return DrainReport(instance_id, moved, not_moved, len(left))

    async def undrain(self, instance_id: str) -> str:
        inst = self._instance(instance_id)
        if inst.state == DEAD:
            raise failed_precondition(f"{instance_id} is dead; it cannot serve again")
        if inst.state == DRAINING:
            inst.state = SERVING
            log.info("undrain %s: dispatching to it again", instance_id)
            await self._save(inst)
            await self._push_now()
        return inst.state

    async def list_migrations(self) -> tuple[list[MigrationRecord], list[MigrationRecord]]:
        live = [i for i in self.instances.values() if i.state != DEAD]
        per = await asyncio.gather(*(asyncio.wait_for(i.handle.actor.list_migrations.remote(),
                                                      self.config.call_timeout_s) for i in live),
                                   return_exceptions=True)
        in_flight = [r for recs in per if not isinstance(recs, BaseException) for r in recs if not r.state.done]
        return in_flight, list(self.recent)

