"""What the serving benchmarks (pd, policies) share: a stretch of a real trace as timed requests, a
deployment of N instances on the local Ray, and a replay over gRPC with the `tidal bench replay` engine.
"""

from __future__ import annotations

import asyncio

import grpc

from orchestrator.bench.traces import TraceRequest, load_trace, scale_lengths
from instance.config import EngineConfig
from orchestrator.bench.replay import Progress, PromptSource, Replay
from orchestrator.bench.schedule import PlannedRequest
from orchestrator.bench.stats import RequestRecord
from orchestrator.config import ServeConfig
from orchestrator.deployment import Deployment

STREAM_TIMEOUT_S = 600.0


def workload(trace: str, first_row: int, n: int, max_prompt: int, max_output: int) -> list[TraceRequest]:
    """`n` consecutive rows of `trace` from `first_row` on, lengths scaled to fit a CPU model."""
    rows = load_trace(trace)[first_row:first_row + n]
    if len(rows) < n:
        raise ValueError(f"{trace} has only {len(rows)} rows from row {first_row}")
    return scale_lengths(rows, max_prompt, max_output)


def at_rate(rows: list[TraceRequest], rate: float, priorities: list[int] | None = None) -> list[PlannedRequest]:
    """The rows as requests sent with the trace's inter-arrival pattern, stretched to a mean rate of `rate`/s."""
    t0 = rows[0].arrival_s
    span = rows[-1].arrival_s - t0
    k = (len(rows) - 1) / rate / span if span > 0 else 0.0
    return [PlannedRequest(i, (r.arrival_s - t0) * k, r.prompt_tokens, r.output_tokens,
                           priorities[i] if priorities else 0) for i, r in enumerate(rows)]


def replay(addr: str, plan: list[PlannedRequest], prompts: PromptSource) -> list[RequestRecord]:
    """Send the plan over gRPC and return what the client saw."""
    run = Replay(plan, prompts, STREAM_TIMEOUT_S, Progress(len(plan), enabled=False))

    async def go() -> None:
        async with grpc.aio.insecure_channel(addr) as channel:
            await run.run(channel)

    asyncio.run(go())
    return run.records


def deploy(name: str, instances: int, engine: dict, **serve) -> Deployment:
    """A started deployment `name` of `instances` instances in the Ray namespace tidal-bench."""
    cfg = ServeConfig(engine=EngineConfig(**engine), instances=instances, host="127.0.0.1", port=0, http_port=0,
                      deployment=name, namespace="tidal-bench", grace_period_s=2.0, **serve)
    d = Deployment(cfg)
    d.start()
    return d
