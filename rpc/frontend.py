"""`FrontendClient`: every call anyone makes on a frontend actor (`orchestrator.frontend.Frontend`): the
deployment starts and stops it, the scheduler pushes instance tables to it, instances push token chunks to it
(as the sink of their streams) and ping it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rpc.call import ActorClient, Call, Deadlines, current_actor, send

if TYPE_CHECKING:
    from instance.messages import TokenChunk
    from rpc.instance import InstanceClient
    from rpc.scheduler import SchedulerClient


@dataclass(frozen=True)
class FrontendClient(ActorClient):
    name: str
    actor: Any
    deadlines: Deadlines = Deadlines()

    @property
    def target(self) -> str:
        return self.name

    @classmethod
    def create(cls, name: str, config: dict, deadlines: Deadlines, *, actor_name: str, namespace: str,
               node_id: str | None = None) -> "FrontendClient":
        """Start a frontend actor (on `node_id` when given: where its port is published)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from orchestrator.frontend import Frontend

        options: dict[str, Any] = dict(name=actor_name, namespace=namespace, num_cpus=0, max_concurrency=10000)
        if node_id is not None:
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
        return cls(name, ray.remote(Frontend).options(**options).remote(config, name), deadlines)

    @classmethod
    def current(cls, name: str, deadlines: Deadlines) -> "FrontendClient":
        """The client of the frontend actor this code runs in (what it hands to instances as a sink)."""
        return cls(name, current_actor(), deadlines)

    # ----- lifecycle (the deployment) ------------------------------------------------------------------------
    def start(self, scheduler: "SchedulerClient") -> Call[int]:
        return self._call("start", scheduler, timeout_s=self.deadlines.startup_s)

    def shutdown(self, grace_s: float) -> Call[int]:
        return self._call("shutdown", grace_s, timeout_s=grace_s + self.deadlines.call_s)

    def http_port(self) -> Call[int]:
        """The port of its HTTP server (the OpenAI API and /metrics)."""
        return self._call("get_http_port")

    def pid(self) -> Call[int]:
        return self._call("pid")

    def is_serving(self) -> Call[bool]:
        return self._call("is_serving")

    # ----- the scheduler -------------------------------------------------------------------------------------
    def update_instances(self, views: list, control: Any = None) -> Call[None]:
        """The instance table, and how the control plane looks (orchestrator.registry.ControlState)."""
        return self._call("update_instances", views, control)

    # ----- instances: the sink of their streams --------------------------------------------------------------
    def ping(self) -> Call[bool]:
        return self._call("ping", timeout_s=self.deadlines.ping_s)

    def push_chunks(self, chunks: "list[TokenChunk]") -> None:
        """Token chunks of one step; sent without waiting (the hot path)."""
        send(self.actor, "push_chunks", chunks)

    def request_moved(self, request_id: str, instance: "InstanceClient") -> None:
        """A migration committed: the request now lives on `instance`. Sent without waiting."""
        send(self.actor, "request_moved", request_id, instance)
