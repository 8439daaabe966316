"""Prefix-aware dispatch: send a request where its prompt's prefix is already cached, unless that instance's
load costs more than the prefill the cache saves.

Each instance reports, with its load, a bounded digest of the hashes of the KV blocks it caches
(`LoadSnapshot.cached_prefixes`, most recently used first). A frontend keeps them in a `PrefixIndex` and counts,
per instance, the leading full blocks of the prompt whose hash the digest holds (hashes chain, so block i's
hash names the whole prefix up to i). The policy then estimates, in tokens, the work each instance does before
this request's first token:

    cost = (prompt tokens - prefix_weight x cached tokens)    what this request still prefills there
         + queued prefill tokens                              what its requests have still to prefill (those
                                                              mid-prefill too), at least its waiting requests'
                                                              demand, and what this frontend
                                                              sent since the snapshot less what those found
                                                              cached (`pending_prefill_tokens`)
         + a memory deficit                                   blocks the prompt needs beyond what is free,
                                                              in tokens (it would wait for them)

and picks the lowest (ties: fewest requests, then at random). With no prefix cached anywhere this is least
queued work; a hot prefix stays on the instance holding it until the queue that builds there costs more than
the saving, and then the next request goes elsewhere (and caches the prefix there too). `prefix_weight` says
how much a cached token is worth against a queued one (1: equal; 0: ignore the cache).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from instance.backend import LoadSnapshot
from instance.kv_cache import blocks_for

if TYPE_CHECKING:
    from orchestrator.policies.dispatch import Candidate


class PrefixIndex:
    """Where prefixes live, as the instances last reported: instance id -> the set of its digest's hashes.
    A set is rebuilt only when an instance reports a new digest."""

    def __init__(self):
        self._digests: dict[str, tuple[tuple[int, ...], frozenset[int]]] = {}

    def update(self, instance_id: str, load: LoadSnapshot) -> None:
        known = self._digests.get(instance_id)
        if known is None or known[0] is not load.cached_prefixes:
            self._digests[instance_id] = (load.cached_prefixes, frozenset(load.cached_prefixes))

    def forget(self, instance_id: str) -> None:
        self._digests.pop(instance_id, None)

    def retain(self, instance_ids) -> None:
        for iid in set(self._digests) - set(instance_ids):
            del self._digests[iid]

    def cached_blocks(self, instance_id: str, prompt_hashes: list[int]) -> int:
        """Leading blocks of the prompt the instance's digest holds."""
        entry = self._digests.get(instance_id)
        if entry is None:
            return 0
        held = entry[1]
        n = 0
        for h in prompt_hashes:
            if h not in held:
                break
            n += 1
        return n


def prefix_cost(c: "Candidate", prompt_tokens: int, prefix_weight: float) -> float:
    """Tokens the instance computes before this request's first token (see the module docstring)."""
    load = c.load
    bs = load.block_size
    cached = min(c.cached_blocks * bs, max(0, prompt_tokens - 1))
    own = prompt_tokens - prefix_weight * cached
    pending = c.pending_prefill_tokens if c.pending_prefill_tokens is not None else c.pending_blocks * bs
    queued = max(load.waiting_demand_blocks * bs, load.prefill_backlog_tokens) + pending
    need = blocks_for(prompt_tokens + 1, bs) - c.cached_blocks
    room = load.free_blocks - load.waiting_demand_blocks - blocks_for(pending, bs)
    deficit = max(0, need - room) * bs
    return own + queued + deficit


def choose_prefix_aware(candidates: list["Candidate"], prompt_tokens: int, rng: random.Random,
                        prefix_weight: float = 1.0) -> str | None:
    """The instance id with the least work before this request's first token; None without candidates."""
    if not candidates:
        return None
    if prefix_weight < 0:
        raise ValueError(f"dispatch_prefix_weight must be at least 0, got {prefix_weight}")
    scored = [(prefix_cost(c, prompt_tokens, prefix_weight),
               c.load.num_running + c.load.num_waiting + c.pending_requests, c.instance_id) for c in candidates]
    best = min(s[:2] for s in scored)
    return rng.choice(sorted(s[2] for s in scored if s[:2] == best))
