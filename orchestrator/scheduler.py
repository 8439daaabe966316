"""GlobalScheduler: the one named, detached Ray actor that knows every instance of a deployment.

It composes parts that each do one job and do not know Ray (they talk to actors through `rpc` clients):

- `Fleet` (orchestrator/fleet.py): the instances — created, or re-found by name after a restart; observed;
  fenced when dead; replaced;
- `Moves` (orchestrator/moves.py): the migrations it starts, tracked until they end, and the rebalance ledger;
- `Reconciler` (orchestrator/reconcile.py): the loop — observe, rebalance, pd, repair, checkpoint, broadcast;
- `Admin` (orchestrator/admin.py): operators' commands (drain, undrain, rebalance, migrate, set-role, scale an
  MoE instance's experts);
- `Scaling` (orchestrator/scaling.py): the instance count, by the autoscaler or `tidal scale`;
- `ExpertAutoscaler` (orchestrator/ep_scaling.py): MoE instances' EP size on step time (off by default);
- `Intent` (orchestrator/intent.py): the target state in the state store, whose outages pause writes only;
- `FrontendRegistry` (orchestrator/registry.py): the frontends the instance table is pushed to.

Its methods are what `rpc.scheduler.SchedulerClient` calls. Tests build it in-process with fake instance
clients and an in-memory store (tests/unit/test_reconcile.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from migration.protocol import MigrationRecord
from orchestrator.admin import Admin, DrainReport
from orchestrator.config import ServeConfig
from orchestrator.ep_scaling import ExpertAutoscaler
from orchestrator.fleet import Fleet, InstanceFactory, InstanceView, RayInstances
from orchestrator.intent import Intent
from orchestrator.metrics import ControlMetrics
from orchestrator.moves import Moves
from orchestrator.reconcile import Reconciler
from orchestrator.registry import ControlState, FrontendRegistry
from orchestrator.scaling import ScaleReport, Scaling
from orchestrator.store import StateStore, StoreError, open_store
from rpc import BackgroundTasks
from rpc.frontend import FrontendClient

log = logging.getLogger(__name__)

__all__ = ["DrainReport", "GlobalScheduler", "InstanceView"]


class GlobalScheduler:
    def __init__(self, config: dict, instances: InstanceFactory | None = None, store: StateStore | None = None,
                 clock: Callable[[], float] = time.monotonic, run_loop: bool = True):
        """`instances`, `store`, `clock`: Ray's instances, the configured store and the monotonic clock unless
        given; `run_loop=False` leaves the reconcile rounds to the caller (`reconciler.run_once()`, in tests)."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = cfg = ServeConfig(**config)
        self.tasks = BackgroundTasks("scheduler")
        # opened unchecked: a scheduler (re)started while the store is down must come up all the same
        self.intent = Intent(store if store is not None else open_store(cfg.state_store, cfg.deployment,
                                                                         check=False))
        self.fleet = Fleet(cfg, instances or RayInstances(cfg), self.intent, self.tasks, clock)
        self.metrics = ControlMetrics()
        self.moves = Moves(self.fleet, cfg.rebalance, self.tasks, clock, self.metrics)
        self.frontends = FrontendRegistry(lambda: ControlState(self.intent.health(), self.scaling.status(),
                                                               self.metrics))
        self.admin = Admin(cfg, self.fleet, self.moves, self.intent, self.frontends, clock)
        self.scaling = Scaling(cfg, self.fleet, self.admin, self.intent,
                               lambda: self.frontends.push_now(self.fleet.views()), self.tasks, clock)
        self.reconciler = Reconciler(cfg, self.fleet, self.moves, self.intent, self.frontends, self.admin.set_role,
                                     self._resume, self.tasks, clock, autoscale=self._autoscale,
                                     metrics=self.metrics)
        self.ep_autoscale = ExpertAutoscaler(cfg.ep_autoscale, self.fleet, self.admin, self.tasks, clock)
        self._start_lock = asyncio.Lock()
        self._run_loop = run_loop
        self._started = False

    def _autoscale(self) -> None:
        """The reconcile loop's autoscale step: the instance count, then MoE instances' EP sizes."""
        self.scaling.autoscale()
        self.ep_autoscale.step()

    # ----- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, observed: list[InstanceView] | None = None) -> list[InstanceView]:
        """Create the instances (or, after a restart, re-find them by name from the stored intent, or from
        `observed`, a frontend's last table, while the store is down), wait until they serve, start the
        reconcile loop, resume interrupted drains. Idempotent."""
        async with self._start_lock:
            if not self._started:
                await self.fleet.start(observed)
                self._started = True
                if self._run_loop:
                    self.tasks.spawn("reconcile loop", self.reconciler.run_forever())
                if self.fleet.intent_known:
                    try:
                        self._resume(await self.intent.saved_drains(), await self.intent.saved_scale())
                    except StoreError:
                        self.fleet.intent_known = False     # the checkpoint step resumes them once it answers
            return self.fleet.views()

    def _resume(self, drains: list[str], scale: dict | None) -> None:
        """Carry on what a previous scheduler left unfinished: a scale operation (its own drain included), and
        drains."""
        if scale is not None:
            self.scaling.resume(scale)
        for instance_id in drains:
            if scale is not None and instance_id == scale.get("removing"):
                continue
            log.info("resuming the interrupted drain of %s", instance_id)
            self.tasks.spawn(f"drain {instance_id}", self.admin.drain(instance_id))

    async def shutdown(self) -> None:
        """Stop the loop, kill the instances this scheduler created and clear its stored state."""
        self.reconciler.stop()
        try:
            await self.intent.forget_all()
        except Exception as e:  # noqa: BLE001 - the store may be down; the instances still go
            log.warning("clearing the state store failed: %r", e)
        self.fleet.kill_all()
        self.tasks.cancel_all()
        log.info("scheduler shut down; %d instances stopped", len(self.fleet.members))

    async def register_frontend(self, name: str, frontend: FrontendClient,
                                table: list[InstanceView] | None = None) -> list[InstanceView]:
        """Frontends register at start and again whenever the scheduler went quiet (it may have restarted),
        with the table they last received."""
        await self.start(table)
        self.frontends.register(name, frontend)
        return self.fleet.views()

    # ----- reads -----------------------------------------------------------------------------------------------
    async def list_instances(self) -> list[InstanceView]:
        return self.fleet.views()

    async def get_timings(self) -> dict[str, float]:
        return dict(self.reconciler.step_timings_ms)

    async def pid(self) -> int:
        """The scheduler's process (for operators, and for fault injection)."""
        return os.getpid()

    async def list_migrations(self) -> tuple[list[MigrationRecord], list[MigrationRecord]]:
        return await self.admin.list_migrations()

    # ----- admin commands --------------------------------------------------------------------------------------
    async def drain(self, instance_id: str) -> DrainReport:
        return await self.admin.drain(instance_id)

    async def undrain(self, instance_id: str) -> str:
        return await self.admin.undrain(instance_id)

    async def rebalance(self) -> list[MigrationRecord]:
        return await self.admin.rebalance()

    async def migrate(self, request_id: str, to_instance: str | None = None) -> MigrationRecord:
        return await self.admin.migrate(request_id, to_instance)

    async def set_role(self, instance_id: str, role: str) -> str:
        return await self.admin.set_role(instance_id, role)

    async def scale_instances(self, instances: int) -> ScaleReport:
        return await self.scaling.scale_to(instances)

    async def scale_experts(self, instance_id: str, ep_size: int, dry_run: bool = False):
        return await self.admin.scale_experts(instance_id, ep_size, dry_run)
