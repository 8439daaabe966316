"""Dispatch: which instance takes a new request.

- round-robin: in turn;
- least-load: fewest running + waiting requests;
- prefix-aware: least work before the first token, counting the prompt's prefix cached there as work saved
  (orchestrator/policies/prefix.py);
- freeness (Llumnix): most (capacity - virtual usage) / batch size, at random among the `top_k` freest; a
  new request queues behind every waiting one, so dispatch counts the whole queue's demand (as Llumnix's
  dispatch does), where migration counts the head's (what blocks the next admission).

Virtual usage (Llumnix, OSDI '24, section 4.4) counts, in blocks, what an instance holds and what it has
promised: the physical blocks of its requests (used + reserved for incoming migrations), the demand of the
head of its waiting queue (it is admitted next), `high_priority_headroom` x capacity for every high-priority
request (priority > 0, running or waiting), so that an instance serving one looks fuller than it is and normal
requests go, or are moved, elsewhere; and an infinite usage while the instance drains, so that it takes
nothing and gives everything away. Freeness divides what is left by the batch size (running + waiting), so
it says how many blocks each request there can still grow by (a deficit is multiplied by it instead).

A frontend dispatches on the last snapshot it was pushed, which can be up to ~100 ms old; it adds what it has
sent since (`pending_requests`, `pending_blocks`) so that a burst does not all land on one instance, and
`top_k` > 1 spreads a burst that several frontends send on the same snapshot.

Expected output (`output_weight`, 0 by default): virtual usage also counts the blocks the instance's requests
will still grow into, `output_weight` x their remaining max_tokens, so that an instance whose batch has just
started long generations is not taken for as free as one whose batch is about to finish. max_tokens is the
per-request hint; the weight says how far to trust it (1: requests run to max_tokens; a deployment whose
requests stop at EOS well before sets the observed share).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from instance.backend import LoadSnapshot
from orchestrator.policies.prefix import choose_prefix_aware

POLICIES = ("round-robin", "least-load", "freeness", "prefix-aware")
HIGH_PRIORITY_HEADROOM = 0.25    # share of an instance's blocks set aside for each high-priority request


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    load: LoadSnapshot
    pending_requests: int = 0     # sent by this frontend, not yet visible in `load`
    pending_blocks: int = 0       # the blocks those requests' prompts need
    batch_slots: int | None = None  # requests the instance runs at once (max_num_seqs), if known
    draining: bool = False        # infinite virtual usage: never dispatched to while another instance is open
    cached_blocks: int = 0        # leading blocks of the prompt cached there (prefix-aware dispatch)
    pending_prefill_tokens: int | None = None  # what the pending requests prefill there, less their cached
                                               # prefix x prefix_weight (None: pending_blocks x block_size)

    @property
    def queue_length(self) -> int:
        """Requests expected to wait: pending ones join the queue if it is not empty, else fill free slots."""
        if self.load.num_waiting > 0 or self.batch_slots is None:
            return self.load.num_waiting + self.pending_requests
        return max(0, self.load.num_running + self.pending_requests - self.batch_slots)

    @property
    def num_requests(self) -> int:
        return self.load.num_running + self.load.num_waiting + self.pending_requests


def virtual_usage(load: LoadSnapshot, pending_blocks: int = 0, draining: bool = False,
                  high_priority_headroom: float = HIGH_PRIORITY_HEADROOM, whole_queue: bool = False,
                  output_weight: float = 0.0) -> float:
    """Blocks an instance holds or has promised (see the module docstring); math.inf while it drains.
    `whole_queue` counts the demand of every waiting request, not only the head's; `output_weight` the blocks
    its requests will still grow into."""
    if draining:
        return math.inf
    physical = load.total_blocks - load.free_blocks               # used + reserved for incoming migrations
    if whole_queue:
        queue = load.waiting_demand_blocks
    else:
        queue = load.head_demand_blocks if load.num_waiting else 0
    headroom = high_priority_headroom * load.total_blocks * load.num_high_priority
    growth = output_weight * load.remaining_output_tokens / load.block_size
    return physical + queue + pending_blocks + headroom + growth


def freeness(c: Candidate, high_priority_headroom: float = HIGH_PRIORITY_HEADROOM,
             whole_queue: bool = False, output_weight: float = 0.0) -> float:
    """(capacity - virtual usage) / batch size; -inf while draining. An idle instance's batch counts as 1.

    When the usage exceeds the capacity (a queue that does not fit), the deficit is multiplied by the batch
    size instead: divided, it would shrink as requests pile up, and the most backed-up instance would look
    the freest."""
    room = c.load.total_blocks - virtual_usage(c.load, c.pending_blocks, c.draining, high_priority_headroom,
                                               whole_queue, output_weight)
    n = max(1, c.num_requests)
    return room / n if room >= 0 else room * n


def choose_instance(policy: str, candidates: list[Candidate], turn: int, rng: random.Random, top_k: int = 1,
                    high_priority_headroom: float = HIGH_PRIORITY_HEADROOM, output_weight: float = 0.0,
                    prompt_tokens: int = 0, prefix_weight: float = 1.0) -> str | None:
    """The instance id to dispatch to, or None if there is no candidate. `turn` drives round-robin; least-load
    and freeness pick at random among the `top_k` best (and among instances tied with the k-th); prefix-aware
    weighs each candidate's `cached_blocks` of the `prompt_tokens`-token prompt against its queue."""
    if not candidates:
        return None
    if top_k < 1:
        raise ValueError(f"dispatch top_k must be at least 1, got {top_k}")
    candidates = [c for c in candidates if not c.draining] or candidates
    if policy == "round-robin":
        ordered = sorted(candidates, key=lambda c: c.instance_id)
        return ordered[turn % len(ordered)].instance_id
    if policy == "least-load":
        return _best(candidates, lambda c: -c.num_requests, top_k, rng)
    if policy == "prefix-aware":
        return choose_prefix_aware(candidates, prompt_tokens, rng, prefix_weight)
    if policy == "freeness":
        return _best(candidates, lambda c: freeness(c, high_priority_headroom, whole_queue=True,
                                                    output_weight=output_weight), top_k, rng)
    raise ValueError(f"dispatch_policy: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _best(candidates: list[Candidate], score, top_k: int, rng: random.Random) -> str:
    scores = {c.instance_id: score(c) for c in candidates}
    bar = sorted(scores.values(), reverse=True)[min(top_k, len(scores)) - 1]
    return rng.choice([c.instance_id for c in candidates if scores[c.instance_id] >= bar])
