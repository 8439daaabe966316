"""GlobalScheduler: the one named, detached Ray actor that knows every instance.

It creates the instances with their Ray resources, then runs one reconcile loop in numbered steps, each
guarded and timed so one failing step does not stop the others:

  1. observe   — poll each instance's status (one outstanding call per instance, never blocking the loop);
  2. decide    — pure policies over the snapshots (migration arrives with its own issue);
  3. act       — carry the decisions out;
  4. broadcast — push the instance table to every registered frontend, which dispatches on it locally.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from instance.actor import InstanceActor
from instance.messages import InstanceInfo, InstanceStatus
from orchestrator.config import ServeConfig
from orchestrator.handles import InstanceHandle

log = logging.getLogger(__name__)

STARTING, SERVING, DRAINING, DEAD = "starting", "serving", "draining", "dead"


@dataclass(frozen=True)
class InstanceView:
    """One row of the instance table as frontends and admin commands see it."""

    instance_id: str
    actor: Any
    state: str
    info: InstanceInfo | None
    status: InstanceStatus | None
    observed_at: float              # time.time() of the status, 0 if none yet


@dataclass
class _Instance:
    handle: InstanceHandle
    state: str = STARTING
    info: InstanceInfo | None = None
    status: InstanceStatus | None = None
    observed_at: float = 0.0
    poll: asyncio.Task | None = None
    failures: int = 0

    def view(self) -> InstanceView:
        return InstanceView(self.handle.instance_id, self.handle.actor, self.state, self.info, self.status,
                            self.observed_at)


@dataclass
class _Frontend:
    actor: Any
    push: asyncio.Task | None = None
    failures: int = field(default=0)


class GlobalScheduler:
    def __init__(self, config: dict):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = ServeConfig(**config)
        self.instances: dict[str, _Instance] = {}
        self.frontends: dict[str, _Frontend] = {}
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self.step_timings_ms: dict[str, float] = {}

    # ----- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> list[InstanceView]:
        """Create the instances, wait until every one serves, start the reconcile loop. Idempotent."""
        cfg = self.config
        if self._loop_task is None:
            actor_cls = ray.remote(InstanceActor)
            threads = max(1, int(cfg.num_cpus_per_instance))
            for i in range(cfg.instances):
                iid = f"instance-{i}"
                actor = actor_cls.options(
                    name=cfg.actor_name(iid), namespace=cfg.namespace, lifetime="detached",
                    num_cpus=cfg.num_cpus_per_instance, num_gpus=cfg.gpus_per_instance,
                    scheduling_strategy="SPREAD", max_restarts=0,
                ).remote(iid, cfg.engine.model_dump(), threads)
                self.instances[iid] = _Instance(InstanceHandle(iid, actor, cfg.call_timeout_s))
            log.info("starting %d instances of %s", cfg.instances, cfg.engine.model)
            await asyncio.gather(*(self._start_instance(inst) for inst in self.instances.values()))
            self._loop_task = asyncio.get_running_loop().create_task(self._reconcile_forever())
        return self.list_instances()

    async def _start_instance(self, inst: _Instance) -> None:
        try:
            inst.info = await inst.handle.start(timeout_s=self.config.startup_timeout_s)
        except Exception as e:
            raise RuntimeError(f"{inst.handle.instance_id} failed to start: {e}") from e
        inst.state = SERVING
        log.info("%s serving on node %s (%s)", inst.handle.instance_id, inst.info.node_ip, inst.info.node_id[:12])

    async def shutdown(self) -> None:
        """Stop the loop and kill the instances this scheduler created."""
        self._stopping = True
        for inst in self.instances.values():
            try:
                inst.handle.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
            inst.state = DEAD
        log.info("scheduler shut down; %d instances stopped", len(self.instances))

    async def register_frontend(self, name: str, actor: Any) -> list[InstanceView]:
        self.frontends[name] = _Frontend(actor)
        log.info("frontend %s registered", name)
        return self.list_instances()

    def list_instances(self) -> list[InstanceView]:
        return [inst.view() for inst in self.instances.values()]

    async def get_timings(self) -> dict[str, float]:
        return dict(self.step_timings_ms)

    # ----- the reconcile loop ----------------------------------------------------------------------------------
    async def _reconcile_forever(self) -> None:
        interval = self.config.load_interval_s
        while not self._stopping:
            started = time.perf_counter()
            for name, step in (("observe", self._observe), ("broadcast", self._broadcast)):
                t0 = time.perf_counter()
                try:
                    step()
                except Exception:
                    log.exception("reconcile step %s failed", name)
                self.step_timings_ms[name] = 1000 * (time.perf_counter() - t0)
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))

    def _observe(self) -> None:
        for inst in self.instances.values():
            if inst.state == DEAD:
                continue
            if inst.poll is not None and inst.poll.done():
                self._take_poll(inst)
            if inst.poll is None:
                inst.poll = asyncio.ensure_future(inst.handle.get_status())

    def _take_poll(self, inst: _Instance) -> None:
        poll, inst.poll = inst.poll, None
        err = poll.exception()
        if err is None:
            inst.status = poll.result()
            inst.observed_at = time.time()
            inst.failures = 0
            return
        inst.failures += 1
        if isinstance(err, ray.exceptions.RayActorError):
            inst.state = DEAD
            log.error("%s is dead: %s", inst.handle.instance_id, err)
        else:
            log.warning("%s: status poll failed (%d in a row): %r", inst.handle.instance_id, inst.failures, err)

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

