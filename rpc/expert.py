"""`ExpertWorkerClient`: every call on an expert worker (`instance.ep.worker.ExpertWorker`), which a MoE
instance's leader starts, feeds with experts and sends each layer's routed rows to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rpc.call import ActorClient, Call, Deadlines

if TYPE_CHECKING:
    import numpy as np

    from instance.ep.worker import ExpertWeights


@dataclass(frozen=True)
class ExpertWorkerClient(ActorClient):
    name: str
    actor: Any
    deadlines: Deadlines = Deadlines()
    layer_timeout_s: float = 10.0      # one layer's rows on this worker
    copy_timeout_s: float = 60.0       # one copy of experts into it

    @property
    def target(self) -> str:
        return f"expert worker {self.name}"

    @classmethod
    def create(cls, name: str, num_cpus: float, deadlines: Deadlines, layer_timeout_s: float,
               copy_timeout_s: float) -> "ExpertWorkerClient":
        """Start an empty worker, owned by the calling process (it dies with its instance). Two calls may
        run at once on it: a copy into it does not hold up the rows of a layer."""
        import ray

        from instance.ep.worker import ExpertWorker

        actor = ray.remote(ExpertWorker).options(num_cpus=num_cpus, max_restarts=0, max_concurrency=2).remote(name)
        return cls(name, actor, deadlines, layer_timeout_s, copy_timeout_s)

    def ping(self) -> Call[int]:
        """Its process id, once it is up (torch imported)."""
        return self._call("ping", timeout_s=self.deadlines.startup_s)

    def run(self, layer: int, inputs: "dict[int, np.ndarray]") -> "Call[dict[int, np.ndarray]]":
        return self._call("run", layer, inputs, timeout_s=self.layer_timeout_s)

    def accept(self, bundle: "dict[tuple[int, int], ExpertWeights]") -> Call[dict]:
        return self._call("accept", bundle, timeout_s=self.copy_timeout_s)

    def accept_from(self, src: "ExpertWorkerClient", keys: list[tuple[int, int]]) -> Call[dict]:
        """Copy experts owner to owner: `src` exports them into Ray's object store and this worker reads them
        from there; the leader never holds the bytes."""
        return Call(self.actor.accept.remote(src.actor.export.remote(keys)), self.target, "accept",
                    self.copy_timeout_s)

    def drop(self, keys: list[tuple[int, int]]) -> Call[int]:
        return self._call("drop", keys)

    def held(self) -> Call[dict]:
        return self._call("held")
