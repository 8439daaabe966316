"""`SchedulerClient`: every call anyone makes on the global scheduler actor
(`orchestrator.scheduler.GlobalScheduler`): the deployment creates and stops it, frontends register with it
and forward admin commands to it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rpc.call import ActorClient, Call, Deadlines, find_actor, kill_actor

if TYPE_CHECKING:
    from migration.protocol import MigrationRecord
    from rpc.frontend import FrontendClient

@dataclass(frozen=True)
class SchedulerClient(ActorClient):
    actor: Any
    deadlines: Deadlines = Deadlines()

    @property
    def target(self) -> str:
        return "the scheduler"

    @classmethod
    def create(cls, config: dict, deadlines: Deadlines, *, actor_name: str, namespace: str,
               node_id: str | None = None) -> "SchedulerClient":
        """Start the named, detached scheduler actor; Ray restarts it whenever it dies."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from orchestrator.scheduler import GlobalScheduler

        options: dict[str, Any] = dict(name=actor_name, namespace=namespace, lifetime="detached", max_restarts=-1,
                                       num_cpus=0, max_concurrency=1000)
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return cls(ray.remote(GlobalScheduler).options(**options).remote(config), deadlines)

    @classmethod
    def find(cls, actor_name: str, namespace: str, deadlines: Deadlines = Deadlines()) -> "SchedulerClient | None":
        actor = find_actor(actor_name, namespace)
        return None if actor is None else cls(actor, deadlines)

    def kill(self, restart: bool = False) -> None:
        """Kill the scheduler; with `restart`, as a crash would: Ray starts it again under the same name."""
        kill_actor(self.actor, restart)

    # ----- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> Call[list]:
        return self._call("start", timeout_s=self.deadlines.startup_s)

    def shutdown(self) -> Call[None]:
        return self._call("shutdown")

    def register_frontend(self, name: str, frontend: "FrontendClient", table: list | None = None,
                          timeout_s: float | None = None) -> Call[list]:
        """Register (again) and get the instance table. `table`: the one this frontend last received, which a
        scheduler restarted while the state store is down recovers from. A registration may wait for the
        instances to start, so callers pass a longer deadline for it."""
        return self._call("register_frontend", name, frontend, table, timeout_s=timeout_s)

    # ----- reads ---------------------------------------------------------------------------------------------
    def list_instances(self) -> Call[list]:
        return self._call("list_instances")

    def get_timings(self) -> Call[dict]:
        return self._call("get_timings")

    def pid(self) -> Call[int]:
        return self._call("pid")

    def list_migrations(self) -> "Call[tuple[list[MigrationRecord], list[MigrationRecord]]]":
        return self._call("list_migrations")

    # ----- admin commands ------------------------------------------------------------------------------------
    def drain(self, instance_id: str) -> Call:
        return self._call("drain", instance_id, timeout_s=self.deadlines.command_s(self.deadlines.drain_work_s))

    def undrain(self, instance_id: str) -> Call[str]:
        return self._call("undrain", instance_id)

    def rebalance(self) -> "Call[list[MigrationRecord]]":
        return self._call("rebalance", timeout_s=self.deadlines.command_s(self.deadlines.migration_s))

    def migrate(self, request_id: str, to_instance: str | None) -> "Call[MigrationRecord]":
        return self._call("migrate", request_id, to_instance,
                          timeout_s=self.deadlines.command_s(self.deadlines.migration_s))

    def set_role(self, instance_id: str, role: str) -> Call[str]:
        return self._call("set_role", instance_id, role)

    def scale_experts(self, instance_id: str, ep_size: int, dry_run: bool = False) -> Call:
        return self._call("scale_experts", instance_id, ep_size, dry_run,
                          timeout_s=self.deadlines.command_s(self.deadlines.startup_s))

    def scale_instances(self, instances: int) -> Call:
        d = self.deadlines
        return self._call("scale_instances", instances, timeout_s=d.command_s(d.startup_s + d.drain_work_s))
