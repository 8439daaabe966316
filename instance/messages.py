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
class ExpertRankStatus:
    """One rank of an MoE instance's expert parallelism: the leader or an expert worker."""

    rank: str
    experts: int                   # (layer, expert) pairs it computes
    load_share: float              # its share of the routed tokens (moving average)
    pid: int = 0
    layers: tuple[str, ...] = ()   # "layer:expert,expert,..." per layer


@dataclass(frozen=True)
class ExpertStatus:
    """Expert parallelism of an MoE instance (None on a dense one)."""

    ep_size: int
    target: int                    # the size asked for (above ep_size while a lost worker is being replaced)
    max_size: int
    ranks: tuple[ExpertRankStatus, ...]
    warm_workers: int              # idle workers ready to take experts
    scaling: str = ""              # the operation in flight, if any
    last_scale: str = ""
    remote_ms_per_layer: float = 0.0   # mean wait for remote ranks per layer call (after the leader's share)
    workers_lost: int = 0
    warm_pids: tuple[int, ...] = ()


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
    experts: ExpertStatus | None = None     # expert parallelism (MoE models)
