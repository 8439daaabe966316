"""Dispatch: which instance takes a new request.

- round-robin: in turn;
- least-load: fewest running + waiting requests;
- freeness (Llumnix): most (free blocks - blocks demanded by waiting requests) / (running + waiting).

A frontend dispatches on the last snapshot it was pushed, which can be up to ~100 ms old; it adds what it has
sent since (`pending_requests`, `pending_blocks`) so that a burst does not all land on one instance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from instance.backend import LoadSnapshot

POLICIES = ("round-robin", "least-load", "freeness")


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    load: LoadSnapshot
    pending_requests: int = 0     # sent by this frontend, not yet visible in `load`
    pending_blocks: int = 0       # the blocks those requests' prompts need
    batch_slots: int | None = None  # requests the instance runs at once (max_num_seqs), if known

    @property
    def queue_length(self) -> int:
        """Requests expected to wait: pending ones join the queue if it is not empty, else fill free slots."""
        if self.load.num_waiting > 0 or self.batch_slots is None:
            return self.load.num_waiting + self.pending_requests
        return max(0, self.load.num_running + self.pending_requests - self.batch_slots)

    @property
    def num_requests(self) -> int:
        return self.load.num_running + self.load.num_waiting + self.pending_requests


def freeness(c: Candidate) -> float:
    free = c.load.free_blocks - c.load.waiting_demand_blocks - c.pending_blocks
    return free / max(1, c.num_requests)


def choose_instance(policy: str, candidates: list[Candidate], turn: int, rng: random.Random) -> str | None:
    """The instance id to dispatch to, or None if there is no candidate. `turn` drives round-robin."""
    if not candidates:
        return None
    if policy == "round-robin":
        ordered = sorted(candidates, key=lambda c: c.instance_id)
        return ordered[turn % len(ordered)].instance_id
    if policy == "least-load":
        return _best(candidates, lambda c: -c.num_requests, rng)
    if policy == "freeness":
        return _best(candidates, freeness, rng)
    raise ValueError(f"dispatch_policy: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _best(candidates: list[Candidate], score, rng: random.Random) -> str:
    top = max(score(c) for c in candidates)
    return rng.choice([c.instance_id for c in candidates if score(c) == top])
