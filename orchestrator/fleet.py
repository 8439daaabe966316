"""The instances of one deployment, as the scheduler keeps them: created (or, after a scheduler restart,
re-found by name from the stored intent), observed, fenced when dead, replaced, and what every other part
reads of them (views for frontends, states for the policies, roles).

Observing never blocks the loop: each instance has at most one status poll in flight, taken when it is done.
An instance is dead when Ray says so (`ActorDead`), or when it has not reported a status for
`instance_timeout_s` — whether its polls hang or keep failing.

The store may be down when a scheduler (re)starts: the fleet then comes up from what it can observe — the
table a frontend last received, or else the instances' actor names — and adopts the stored intent of what it
could not observe (a drain, a role) once the store answers again (`adopt_stored_intent`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from instance.backends import check_same_backend
from instance.messages import InstanceInfo, InstanceStatus
from orchestrator.config import ServeConfig
from orchestrator.errors import not_found
from orchestrator.intent import Intent
from orchestrator.store import StoreError
from orchestrator.policies.migration import InstanceState
from orchestrator.policies.pd import BOTH, DECODE, PREFILL, takes_decodes
from rpc import ActorDead, BackgroundTasks
from rpc.instance import InstanceClient

log = logging.getLogger(__name__)

STARTING, SERVING, DRAINING, DEAD = "starting", "serving", "draining", "dead"
REPLACE_DELAY_S = 1.0          # let Ray release a dead actor's name before a replacement takes it ...
REPLACE_BACKOFF_MAX_S = 30.0   # ... and after each failed replacement twice as long, up to this


@dataclass(frozen=True)
class InstanceView:
    """One row of the instance table as frontends and admin commands see it."""

    instance_id: str
    client: InstanceClient
    state: str
    info: InstanceInfo | None
    status: InstanceStatus | None
    observed_at: float              # time.time() of the status, 0 if none yet
    role: str = BOTH                # prefill | decode | both


class InstanceFactory(Protocol):
    """Makes the clients of a deployment's instances (`RayInstances`; the scheduler's tests pass fakes)."""

    def create(self, instance_id: str) -> InstanceClient: ...

    def find(self, instance_id: str) -> InstanceClient | None: ...

    def request_capacity(self, instances: int) -> None:
        """Ask the cluster for room for this many instances (a Ray autoscaler adds nodes); may do nothing."""


class RayInstances:
    """Instance actors on Ray: named and detached, so a restarted scheduler finds them again."""

    def __init__(self, config: ServeConfig):
        self.config = config

    def create(self, instance_id: str) -> InstanceClient:
        cfg = self.config
        return InstanceClient.create(instance_id, cfg.engine.model_dump(), cfg.migration.model_dump(),
                                     cfg.deadlines, name=cfg.actor_name(instance_id), namespace=cfg.namespace,
                                     detached=True, num_cpus=cfg.num_cpus_per_instance,
                                     num_gpus=cfg.gpus_per_instance, spread=True)

    def find(self, instance_id: str) -> InstanceClient | None:
        cfg = self.config
        return InstanceClient.find(instance_id, cfg.actor_name(instance_id), cfg.namespace, cfg.deadlines)

    def request_capacity(self, instances: int) -> None:
        """On a cluster (--ray-address), tell Ray's autoscaler the resources `instances` instances need, so it
        adds nodes before they are created; a local Ray has no autoscaler and needs nothing."""
        if not self.config.ray_address:
            return
        from ray.autoscaler.sdk import request_resources

        bundle = {"CPU": self.config.num_cpus_per_instance}
        if self.config.gpus_per_instance:
            bundle["GPU"] = self.config.gpus_per_instance
        request_resources(bundles=[bundle] * instances)


@dataclass
class Member:
    """One instance of the fleet."""

    client: InstanceClient
    role: str = BOTH
    state: str = STARTING
    info: InstanceInfo | None = None
    status: InstanceStatus | None = None
    observed_at: float = 0.0        # time.time() of `status`
    status_asked_at: float = 0.0    # clock() when the poll that returned `status` was sent
    last_ok: float = 0.0            # clock() when the last poll that got a status was sent
    poll: asyncio.Future | None = None
    poll_sent_at: float = 0.0       # clock() when the outstanding poll was sent
    failures: int = 0               # polls failed in a row
    replacing: asyncio.Task | None = None
    replace_attempts: int = 0       # replacements that failed in a row
    intent_observed: bool = False   # its state and role came from what was observed, not from the store

    @property
    def instance_id(self) -> str:
        return self.client.instance_id

    def view(self) -> InstanceView:
        return InstanceView(self.instance_id, self.client, self.state, self.info, self.status, self.observed_at,
                            self.role)

    def policy_state(self) -> InstanceState | None:
        if self.status is None or self.state == DEAD:
            return None
        return InstanceState(self.instance_id, self.status.load, self.status.requests,
                             accepting=self.state == SERVING, migrations_out=self.status.migrations_out,
                             migrations_in=self.status.migrations_in, draining=self.state == DRAINING)


class Fleet:
    def __init__(self, config: ServeConfig, factory: InstanceFactory, intent: Intent, tasks: BackgroundTasks,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.factory = factory
        self.intent = intent
        self.tasks = tasks
        self.clock = clock
        self.members: dict[str, Member] = {}
        self.intent_known = True        # False while the fleet runs on observed intent (the store was down)

    # ----- bringing it up ------------------------------------------------------------------------------------
    async def start(self, observed: list[InstanceView] | None = None) -> None:
        """Create the instances, or re-find them by name after a scheduler restart; wait until they serve; store
        the intent. If the store is unreachable, recover from `observed` (the table a frontend last got) or
        from the instances' names, and adopt the stored intent later."""
        cfg = self.config
        try:
            saved = await self.intent.saved_instances()
        except StoreError as e:
            self.intent_known = False
            saved = self._observed_intent(observed)
            log.warning("state store unreachable at start (%s); recovering from %s", e,
                        "the table a frontend last received" if observed else "the instances' names")
        if saved and await self._recover(saved):
            log.info("recovered %d instances (intent from %s)", len(self.members),
                     self.intent.url if self.intent_known else "what was observed")
            for m in self.members.values():
                m.intent_observed = not self.intent_known and not observed
        else:
            if saved and self.intent_known:
                log.warning("stored state names %d instances but none is alive: starting afresh", len(saved))
                await self.intent.forget_all()
            self.members.clear()
            for i in range(cfg.instances):
                iid = f"instance-{i}"
                self.members[iid] = Member(self.factory.create(iid), role=cfg.initial_role(i))
            roles = [m.role for m in self.members.values()]
            log.info("starting %d instances of %s%s", cfg.instances, cfg.engine.model,
                     f" ({roles.count(PREFILL)} prefill, {roles.count(DECODE)} decode, {roles.count(BOTH)} both)"
                     if set(roles) != {BOTH} else "")
            await asyncio.gather(*(self._start_member(m) for m in self.members.values()))
        self._check_backends()
        for m in self.members.values():
            await self.save(m)

    def _check_backends(self) -> None:
        """One deployment, one backend: instances found running another one than configured are refused."""
        kinds = {m.instance_id: m.info.backend for m in self.members.values() if m.info is not None}
        try:
            check_same_backend({**kinds, "the configuration": self.config.engine.backend})
        except ValueError as e:
            raise RuntimeError(str(e)) from None

    def _observed_intent(self, observed: list[InstanceView] | None) -> dict[str, dict]:
        """Intent records as the store would hold them, from a frontend's table or else the configured names."""
        if observed:
            return {f"instance/{v.instance_id}": {"instance_id": v.instance_id, "role": v.role,
                                                  "state": DRAINING if v.state == DRAINING else SERVING}
                    for v in observed}
        return {f"instance/instance-{i}": {"instance_id": f"instance-{i}", "role": self.config.initial_role(i),
                                           "state": SERVING} for i in range(self.config.instances)}

    async def adopt_stored_intent(self) -> list[str]:
        """The store answers again after a start without it: take its drains and roles for the instances whose
        intent was guessed from their names (a frontend's table is newer than the store, so it stays), write
        the fleet's intent, and return the drains that were in progress. StoreError if it is still down."""
        saved = await self.intent.saved_instances()
        drains = await self.intent.saved_drains()
        for rec in saved.values():
            m = self.members.get(rec["instance_id"])
            if m is not None and m.intent_observed and m.state != DEAD:
                m.role = rec.get("role", m.role)
                m.state = DRAINING if rec.get("state") == DRAINING else m.state
            if m is not None:
                m.intent_observed = False
        self.intent_known = True
        for m in self.members.values():
            await self.save(m)
        log.info("state store %s reachable: intent of %d instances adopted and written", self.intent.url,
                 len(self.members))
        return drains

    async def _recover(self, saved: dict[str, dict]) -> bool:
        """Re-find the stored instances by actor name. True if at least one is alive."""
        alive = 0
        for _, rec in sorted(saved.items()):
            iid = rec["instance_id"]
            client = self.factory.find(iid)
            m = Member(client or InstanceClient(iid, None, self.config.deadlines), role=rec.get("role", BOTH))
            self.members[iid] = m
            if client is None:
                m.state = DEAD
                log.warning("%s is gone since the scheduler last ran", iid)
                continue
            try:
                await self._start_member(m)
                m.state = rec.get("state", SERVING)
                alive += 1
            except Exception as e:  # noqa: BLE001 - counted as dead; repair may replace it
                m.state = DEAD
                log.warning("%s did not answer after the scheduler restarted: %s", iid, e)
        return alive > 0

    async def _start_member(self, m: Member) -> None:
        try:
            m.info = await m.client.start()
        except Exception as e:
            raise RuntimeError(f"{m.instance_id} failed to start: {e}") from e
        m.status = await m.client.get_status()
        m.observed_at, m.last_ok = time.time(), self.clock()
        m.state = SERVING
        log.info("%s serving on node %s (%s)", m.instance_id, m.info.node_ip, m.info.node_id[:12])

    async def save(self, m: Member) -> None:
        """Persist an instance's intent: it exists, serving or draining, and its role."""
        await self.intent.save_instance(m.instance_id, DRAINING if m.state == DRAINING else SERVING, m.role)

    def next_ids(self, n: int) -> list[str]:
        """Ids for n new instances, after the highest in use (ids of removed instances are not reused)."""
        top = max((int(iid.rsplit("-", 1)[1]) for iid in self.members), default=-1)
        return [f"instance-{top + 1 + k}" for k in range(n)]

    async def add(self, instance_id: str, role: str = BOTH) -> Member:
        """Create (or, after a scheduler restart, re-find) an instance and wait until it serves; it shows as
        starting meanwhile, so it joins dispatch only once ready. Raises if it fails to start."""
        client = self.factory.find(instance_id) or self.factory.create(instance_id)
        m = self.members[instance_id] = Member(client, role=role)
        try:
            await self._start_member(m)
        except Exception:
            m.state = DEAD
            raise
        await self.save(m)
        return m

    async def remove(self, instance_id: str) -> None:
        """Stop an instance and forget it (the caller has emptied it first)."""
        m = self.members.pop(instance_id)
        if m.poll is not None:
            m.poll.cancel()
        m.client.kill()
        await self.intent.forget_instance(instance_id)
        log.info("%s stopped and removed from the deployment", instance_id)

    def kill_all(self) -> None:
        for m in self.members.values():
            m.client.kill()
            m.state = DEAD

    # ----- observe -------------------------------------------------------------------------------------------
    def observe(self) -> None:
        """Take the polls that came back, fence the silent, send the next polls."""
        now = self.clock()
        for m in self.members.values():
            if m.state in (DEAD, STARTING):
                continue
            if m.poll is not None and m.poll.done():
                self._take_poll(m)
            if m.state != DEAD and now - m.last_ok > self.config.instance_timeout_s:
                self.declare_dead(m, f"no status report for {self.config.instance_timeout_s:.1f} s"
                                     + (f" ({m.failures} polls failed)" if m.failures else ""))
            if m.poll is None and m.state != DEAD:
                m.poll = asyncio.ensure_future(m.client.get_status())
                m.poll_sent_at = now

    def _take_poll(self, m: Member) -> None:
        poll, m.poll = m.poll, None
        err = poll.exception()
        if err is None:
            m.status = poll.result()
            m.observed_at, m.status_asked_at, m.last_ok = time.time(), m.poll_sent_at, m.poll_sent_at
            m.failures = 0
            return
        m.failures += 1
        if isinstance(err, ActorDead):
            self.declare_dead(m, str(err))
        else:
            log.warning("%s: status poll failed (%d in a row): %s", m.instance_id, m.failures, err)

    def declare_dead(self, m: Member, why: str) -> None:
        """Stop dispatching to it; frontends resume its requests elsewhere. Killed to be sure it stays quiet."""
        m.state = DEAD
        if m.poll is not None:
            m.poll.cancel()
            m.poll = None
        log.error("%s is dead: %s", m.instance_id, why)
        m.client.kill()

    # ----- repair --------------------------------------------------------------------------------------------
    def repair(self) -> None:
        """Replace dead instances (with --restart-dead-instances)."""
        if not self.config.restart_dead_instances:
            return
        for m in self.members.values():
            if m.state == DEAD and (m.replacing is None or m.replacing.done()):
                m.replacing = self.tasks.spawn(f"replace {m.instance_id}", self._replace(m))

    async def _replace(self, m: Member) -> None:
        """Start a new instance under the dead one's name; one that fails (or dies while starting) is tried
        again after a delay that doubles each time, so churn neither stops repair nor hammers the cluster."""
        iid = m.instance_id
        await asyncio.sleep(min(REPLACE_BACKOFF_MAX_S, REPLACE_DELAY_S * 2 ** m.replace_attempts))
        log.info("restarting %s%s", iid, f" (attempt {m.replace_attempts + 1})" if m.replace_attempts else "")
        try:
            client = self.factory.create(iid)
        except Exception as e:  # noqa: BLE001 - e.g. the old actor's name not yet released: try again later
            m.replace_attempts += 1
            log.error("restarting %s failed: %s", iid, e)
            return
        fresh = Member(client, role=m.role, replacing=m.replacing, replace_attempts=m.replace_attempts + 1)
        self.members[iid] = fresh
        try:
            await self._start_member(fresh)
            fresh.replace_attempts = 0
            await self.save(fresh)
        except Exception as e:  # noqa: BLE001 - try again on the next round
            log.error("restarting %s failed: %s", iid, e)
            fresh.state = DEAD
            fresh.client.kill()

    # ----- what the rest reads -------------------------------------------------------------------------------
    def get(self, instance_id: str) -> Member:
        m = self.members.get(instance_id)
        if m is None:
            raise not_found(f"instance_id: no instance {instance_id!r}; `tidal status` lists them")
        return m

    def live(self) -> list[Member]:
        return [m for m in self.members.values() if m.state != DEAD]

    def views(self) -> list[InstanceView]:
        return [m.view() for m in self.members.values()]

    def roles(self) -> dict[str, str]:
        return {iid: m.role for iid, m in self.members.items()}

    def states(self) -> list[InstanceState]:
        """Policy states of the live instances that have reported."""
        return [s for s in (m.policy_state() for m in self.members.values()) if s is not None]

    def decode_states(self) -> list[InstanceState]:
        """Policy states of the live instances requests may decode on (decode and both), or of every live
        instance if none of those serves: then prefill instances decode too."""
        states = self.states()
        serving = [s.instance_id for s in states if s.accepting]
        pool = set(takes_decodes(self.roles(), serving))
        return [s for s in states if s.instance_id in pool] if pool else states
