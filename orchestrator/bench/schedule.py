"""When each request of a replay is sent, and with which lengths and priority: pure, seeded, no I/O.

Arrivals are either the trace's own timestamps divided by a rate scale (2 = twice as fast), or synthetic ones at
a given rate: Poisson (exponential gaps) or gamma gaps with a coefficient of variation (CV 1 is Poisson, above 1
burstier, below 1 more regular). Lengths always come from the trace rows, in the trace's order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Sequence

from orchestrator.bench.traces import TraceRequest

Arrivals = Literal["trace", "poisson", "gamma"]


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    at_s: float             # when to send, seconds after the run starts
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    hash_ids: tuple[int, ...] = ()    # the trace's prompt blocks (Mooncake), for prompts that share as it does
    block_tokens: float = 512.0       # tokens per hash id, scaled with the lengths


def parse_priority_mix(text: str) -> list[tuple[float, int]]:
    """'0.1:1' -> [(0.1, 1)]: that fraction of requests gets that priority; several classes as '0.1:2,0.3:1'.
    The rest get priority 0."""
    mix: list[tuple[float, int]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        fraction, sep, value = part.partition(":")
        try:
            if not sep:
                raise ValueError
            mix.append((float(fraction), int(value)))
        except ValueError:
            raise ValueError(f"--priority-mix: {part!r} is not FRACTION:PRIORITY, e.g. 0.1:1") from None
    if any(not 0.0 <= f <= 1.0 for f, _ in mix) or sum(f for f, _ in mix) > 1.0 + 1e-9:
        raise ValueError(f"--priority-mix: fractions must each be in [0, 1] and add up to at most 1, got {text!r}")
    return mix


def arrival_gaps(n: int, rate: float, cv: float, rng: random.Random) -> list[float]:
    """n gaps between arrivals with mean 1/rate and coefficient of variation cv (gamma; cv=1 is exponential)."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"rate and cv must be positive, got rate={rate}, cv={cv}")
    shape = 1.0 / (cv * cv)
    return [rng.gammavariate(shape, 1.0 / (rate * shape)) for _ in range(n)]


def build_schedule(rows: Sequence[TraceRequest], *, arrivals: Arrivals = "trace", rate_scale: float = 1.0,
                   rate: float | None = None, cv: float = 1.0, duration_s: float | None = None,
                   num_requests: int | None = None, priority_mix: Sequence[tuple[float, int]] = (),
                   seed: int = 0) -> list[PlannedRequest]:
    """The requests to send, in send order: at most `num_requests`, all sent before `duration_s`.

    With synthetic arrivals the first request goes at 0 and each next one a random gap later; the trace rows
    give the lengths in order, so the run ends when the rows (or the duration, or num_requests) run out.
    """
    if arrivals == "trace":
        if rate_scale <= 0:
            raise ValueError(f"--rate-scale must be positive, got {rate_scale}")
        times = [r.arrival_s / rate_scale for r in rows]
    elif arrivals in ("poisson", "gamma"):
        if rate is None:
            raise ValueError(f"--arrivals {arrivals} needs --rate (requests per second)")
        gaps = arrival_gaps(len(rows), rate, 1.0 if arrivals == "poisson" else cv, random.Random(f"{seed}-arrivals"))
        times, t = [], 0.0
        for gap in [0.0, *gaps[1:]]:
            t += gap
            times.append(t)
    else:
        raise ValueError(f"--arrivals must be trace, poisson or gamma, got {arrivals!r}")
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"--num-requests must be at least 1, got {num_requests}")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"--duration must be positive, got {duration_s}")

    pick = random.Random(f"{seed}-priority")
    plan: list[PlannedRequest] = []
    for row, at in zip(rows, times):
        if (num_requests is not None and len(plan) >= num_requests) or (duration_s is not None and at >= duration_s):
            break
        plan.append(PlannedRequest(len(plan), at, row.prompt_tokens, row.output_tokens, _priority(pick, priority_mix),
                                   row.hash_ids, row.block_tokens))
    return plan


def _priority(rng: random.Random, mix: Sequence[tuple[float, int]]) -> int:
    u, edge = rng.random(), 0.0
    for fraction, value in mix:
        edge += fraction
        if u < edge:
            return value
    return 0
