"""The interface the instance layer uses to talk to an engine, and the load snapshot every engine reports.

`InstanceActor` and the migration protocol see only `EngineBackend`, so another engine (vLLM on GPU fleets)
can plug in here without touching the orchestrator. `create_backend` picks one by name.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from instance.config import EngineConfig
    from instance.request import RequestOutput, RequestState
    from instance.sampling import SamplingParams
    from instance.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadSnapshot:
    """An engine's load after a step. Plain values only: cheap to build every step and to send anywhere."""

    total_blocks: int
    free_blocks: int
    used_blocks: int
    reserved_blocks: int
    block_size: int
    num_running: int
    num_waiting: int
    num_preempted: int            # waiting requests that were preempted and wait to be recomputed
    num_suspended: int            # taken out of the batch for a migration
    head_demand_blocks: int       # blocks the head of the waiting queue needs to be admitted
    waiting_demand_blocks: int    # blocks all waiting requests need
    running_tokens: int           # tokens (prompt + output) of the running batch
    step_time_ms: float           # mean step time over the last few seconds
    tokens_per_s: float           # tokens computed per second of step time over the last few seconds
    num_preemptions_total: int
    num_high_priority: int = 0    # running or waiting requests with priority > 0 (policies give them headroom)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RequestInfo:
    """One request as the control plane sees it (migration, policies, status)."""

    request_id: str
    status: str                   # waiting | running | suspended
    num_tokens: int               # prompt + output so far
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int
    num_computed_tokens: int
    priority: int
    num_preemptions: int
    block_ids: tuple[int, ...] = ()


class EngineBackend(abc.ABC):
    """What an instance needs from an engine. All methods are called from one thread."""

    tokenizer: "Tokenizer"
    max_model_len: int
    model_name: str

    # serving
    @abc.abstractmethod
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: "SamplingParams | None" = None, priority: int = 0,
                    arrival_time: float | None = None) -> None: ...

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    def step(self) -> list["RequestOutput"]: ...

    @abc.abstractmethod
    def has_unfinished(self) -> bool: ...

    @abc.abstractmethod
    def load(self) -> LoadSnapshot: ...

    @abc.abstractmethod
    def check_integrity(self) -> None: ...

    @abc.abstractmethod
    def request_info(self, request_id: str, with_blocks: bool = False) -> RequestInfo | None: ...

    @abc.abstractmethod
    def list_requests(self) -> list[RequestInfo]: ...

    # migration: source half
    @abc.abstractmethod
    def get_block_ids(self, request_id: str) -> list[int]: ...

    @abc.abstractmethod
    def num_computed_tokens(self, request_id: str) -> int: ...

    @abc.abstractmethod
    def export_blocks(self, block_ids: list[int]) -> "torch.Tensor": ...

    @abc.abstractmethod
    def suspend(self, request_id: str) -> "RequestState": ...

    @abc.abstractmethod
    def resume(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def free_suspended(self, request_id: str) -> None: ...

    # migration: destination half
    @abc.abstractmethod
    def reserve_blocks(self, n: int) -> list[int]: ...

    @abc.abstractmethod
    def import_blocks(self, block_ids: list[int], blocks: "torch.Tensor") -> None: ...

    @abc.abstractmethod
    def release_reserved(self, block_ids: list[int]) -> None: ...

    @abc.abstractmethod
    def admit_migrated(self, state: "RequestState", block_ids: list[int]) -> None: ...


BACKENDS = ("native",)


def create_backend(config: "EngineConfig", kind: str = "native") -> EngineBackend:
    if kind == "native":
        from instance.engine import Engine

        return Engine(config)
    if kind == "vllm":
        raise ValueError("backend: the vLLM backend is not part of this build yet; use backend 'native'")
    raise ValueError(f"backend: unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")
