"""`InstanceClient`: every call anyone makes on an instance actor (`instance.actor.InstanceActor`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from migration.protocol import MigrationAborted, MigrationState
from rpc.call import ActorClient, ActorDead, ActorTimeout, Call, Deadlines, Rejected, current_actor, find_actor

if TYPE_CHECKING:
    from instance.backend import RequestInfo
    from instance.messages import InstanceInfo, InstanceStatus
    from instance.sampling import SamplingParams
    from migration.protocol import MigrationRecord
    from rpc.frontend import FrontendClient


@dataclass(frozen=True)
class InstanceClient(ActorClient):
    """Calls on one instance; `actor` None is an instance known to be gone (every call raises ActorDead)."""

    instance_id: str
    actor: Any
    deadlines: Deadlines = Deadlines()

    @property
    def target(self) -> str:
        return self.instance_id

    # ----- create / find / kill ------------------------------------------------------------------------------
    @classmethod
    def create(cls, instance_id: str, engine: dict, migration: dict, deadlines: Deadlines, *,
               name: str | None = None, namespace: str | None = None, detached: bool = False,
               num_cpus: float = 1.0, num_gpus: float = 0.0, spread: bool = False) -> "InstanceClient":
        """Start an instance actor (it loads its model in `start()`); named and detached when the scheduler
        creates it, so that a restarted scheduler finds it again."""
        import ray

        from instance.actor import InstanceActor

        options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=1000)
        if name is not None:
            options.update(name=name, namespace=namespace)
        if detached:
            options["lifetime"] = "detached"
        if spread:
            options["scheduling_strategy"] = "SPREAD"
        actor = ray.remote(InstanceActor).options(**options).remote(
            instance_id, engine, max(1, int(num_cpus)), migration, deadlines.__dict__)
        return cls(instance_id, actor, deadlines)

    @classmethod
    def find(cls, instance_id: str, name: str, namespace: str, deadlines: Deadlines) -> "InstanceClient | None":
        actor = find_actor(name, namespace)
        return None if actor is None else cls(instance_id, actor, deadlines)

    @classmethod
    def current(cls, instance_id: str, deadlines: Deadlines) -> "InstanceClient":
        """The client of the instance actor this code runs in (what it hands to frontends)."""
        return cls(instance_id, current_actor(), deadlines)

    def with_call_deadline(self, seconds: float) -> "InstanceClient":
        return replace(self, deadlines=replace(self.deadlines, call_s=seconds))

    # ----- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> "Call[InstanceInfo]":
        return self._call("start", timeout_s=self.deadlines.startup_s)

    def stop(self) -> Call[None]:
        return self._call("stop")

    def get_status(self) -> "Call[InstanceStatus]":
        return self._call("get_status")

    def check_integrity(self) -> Call[None]:
        return self._call("check_integrity")

    # ----- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: "SamplingParams", priority: int,
                    sink: "FrontendClient") -> Call[int]:
        return self._call("add_request", request_id, prompt_token_ids, params, priority, sink)

    def recover_request(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                        params: "SamplingParams", seed: int, priority: int, text_emitted: int,
                        sink: "FrontendClient", next_seq: int) -> Call[int]:
        return self._call("recover_request", request_id, prompt_token_ids, output_token_ids, params, seed,
                          priority, text_emitted, sink, next_seq)

    def abort_request(self, request_id: str) -> Call[bool]:
        return self._call("abort_request", request_id)

    def request_info(self, request_id: str) -> "Call[RequestInfo | None]":
        return self._call("request_info", request_id)

    # ----- expert parallelism --------------------------------------------------------------------------------
    def scale_experts(self, ep_size: int, dry_run: bool = False, timeout_s: float | None = None) -> "Call[Any]":
        """An MoE instance's EP size (instance.ep.scaler.ScaleReport); it may start workers and copy experts."""
        return self._call("scale_experts", ep_size, dry_run, timeout_s=timeout_s or self.deadlines.startup_s)

    # ----- migration -----------------------------------------------------------------------------------------
    def migrate_out(self, request_id: str, dst: "InstanceClient", migration_id: str | None = None,
                    handoff: bool = False) -> "Call[MigrationRecord]":
        deadline = self.deadlines.handoff_s if handoff else self.deadlines.migration_s
        return self._call("migrate_out", request_id, dst, migration_id, handoff, timeout_s=deadline)

    def list_migrations(self) -> "Call[list[MigrationRecord]]":
        return self._call("list_migrations")

    def as_destination(self, call_timeout_s: float) -> "MigrationPeer":
        """This instance as the destination of a migration, each call bounded by `call_timeout_s`."""
        return MigrationPeer(self.with_call_deadline(call_timeout_s))


class MigrationPeer:
    """The destination half as the source half calls it (`migration.protocol.DestinationPeer`): every failure
    comes back as MigrationAborted(ABORTED_DST), with what happened."""

    def __init__(self, client: InstanceClient):
        self.client = client
        self.instance_id = client.instance_id

    async def _call(self, method: str, *args) -> Any:
        try:
            return await self.client._call(method, *args)
        except Rejected as e:
            if isinstance(e.cause, MigrationAborted):
                raise e.cause from None
            raise MigrationAborted(MigrationState.ABORTED_DST,
                                   f"{method} failed on {self.instance_id}: {e.cause!r}") from None
        except ActorDead:
            raise MigrationAborted(MigrationState.ABORTED_DST, f"destination {self.instance_id} died") from None
        except ActorTimeout:
            raise MigrationAborted(MigrationState.ABORTED_DST, f"{method} on {self.instance_id} timed out after "
                                   f"{self.client.deadlines.call_s:.0f} s") from None

    async def attach_prefix(self, migration_id: str, request_id: str, src: str, hashes: list[int]) -> int:
        return await self._call("migration_attach_prefix", migration_id, request_id, src, hashes)

    async def reserve(self, migration_id: str, request_id: str, src: str, n: int) -> int:
        return await self._call("migration_reserve", migration_id, request_id, src, n)

    async def receive(self, migration_id: str, first: int, payload: Any) -> None:
        await self._call("migration_receive", migration_id, first, payload)

    async def commit(self, migration_id: str, state: Any, sink: Any, next_seq: int) -> None:
        await self._call("migration_commit", migration_id, state, sink, next_seq)

    async def abort(self, migration_id: str) -> None:
        await self._call("migration_abort", migration_id)

    async def abort_request(self, request_id: str) -> None:
        await self._call("abort_request", request_id)
