"""Messages an instance sends to other processes: a closed set of typed dataclasses, plain values only."""

from __future__ import annotations

from dataclasses import dataclass

from instance.backend import LoadSnapshot, RequestInfo


@dataclass(frozen=True)
class TokenChunk:
    """Tokens of one request produced by one engine step, sent straight to the frontend that owns it."""

    request_id: str
    seq: int                       # contiguous from 0 within the request's stream
    token_ids: tuple[int, ...]
    text: str
    instance_id: str
    finish_reason: str | None = None   # "stop" | "length" | "abort" on the last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0
    produced_at: float = 0.0           # time.time() when the step that produced these tokens ended


@dataclass(frozen=True)
class InstanceInfo:
    """What an instance serves; fixed for its lifetime."""

    instance_id: str
    node_id: str
    node_ip: str
    model: str
    max_model_len: int
    vocab_size: int
    pid: int = 0                   # the worker process, for operators (and fault-injection tests)
    backend: str = "native"        # its engine: native or vllm (requests move only between instances of one)


@dataclass(frozen=True)
class InstanceStatus:
    """An instance's load as observed after one of its steps."""

    instance_id: str
    load: LoadSnapshot
    step_index: int                # steps run so far; requests added before step k show up from step k on
    num_requests: int              # requests this instance holds (running, waiting, suspended)
    requests: tuple[RequestInfo, ...] = ()      # what the migration policy chooses from
    migrations_out: int = 0        # outgoing migrations in flight
    migrations_in: int = 0         # incoming migrations in flight (reservations held)
