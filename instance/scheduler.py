"""Continuous batching inside one engine: decide what the next step computes.

`schedule()` returns a plain `SchedulerOutput`; it moves block ids and counters, never tensors. Running
requests go first (decodes and unfinished prefills, highest priority first), then waiting requests are
admitted in (priority, arrival) order while the step's token budget and free blocks last. A request is admitted
only when the blocks for its whole prompt (every token it has to compute, not just this step's chunk) fit with
one block to spare per running request, and it gets them all at once: a long prompt admitted on its first
chunk would otherwise take the blocks the running decodes grow into and preempt them for its later chunks,
and under a burst that thrashes (each preemption is recomputed). When a running
request needs a block and none is free, the lowest-priority, newest running request is preempted: its blocks
are freed and it waits to be recomputed. One request alone always fits (the engine checks that the cache
holds `max_model_len` tokens), so preemption always makes progress.

Prefix caching (when the core gives a `hash_seed`): a request admitted with nothing computed first takes the
longest run of its full blocks that the pool has cached (shared, one more reference each) and starts computing
after them; at least its last token is always computed, since the next token is sampled from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from instance.backend import LoadSnapshot
from instance.kv_cache import BlockPool, block_hashes, blocks_for
from instance.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int            # tokens computed this step, starting at request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last token, so a new token is sampled after it."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, pool: BlockPool, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                 hash_seed: str | None = None):
        """`hash_seed`: what names the model in prefix-cache hashes; None when prefix caching is off."""
        self.pool = pool
        self.hash_seed = hash_seed
        self.prefix_query_tokens = 0    # tokens of admitted requests (each admission counts)
        self.prefix_hit_tokens = 0      # of those, tokens found in the prefix cache
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: list[Request] = []   # kept sorted by Request.sort_key
        self.running: list[Request] = []   # kept sorted by Request.sort_key
        self.num_preemptions_total = 0

    # ----- queue changes -------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        _insert_sorted(self.waiting, req)

    def add_running(self, req: Request) -> None:
        """Put a request that already holds its blocks straight into the batch (resumed or migrated in)."""
        req.status = RequestStatus.RUNNING
        _insert_sorted(self.running, req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues, leaving its blocks alone."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def free_blocks(self, req: Request) -> None:
        if req.block_ids:
            self.pool.free(req.block_ids)
            req.block_ids = []
        req.num_cached_blocks = 0

    # ----- prefix caching ------------------------------------------------------------------------------------
    def hashes(self, req: Request, n: int) -> list[int]:
        """The prefix-cache hashes of req's first n full blocks (computed once per request, then extended)."""
        hs = req.block_hashes
        if len(hs) < n:
            hs += block_hashes(req.token_ids[:n * self.block_size], self.block_size, self.hash_seed,
                               start=len(hs), parent=hs[-1] if hs else None)
        return hs[:n]

    def _cached_prefix(self, req: Request) -> list[int]:
        if self.hash_seed is None or req.block_ids or req.num_computed_tokens:
            return []
        return self.pool.cached_prefix(self.hashes(req, (req.num_tokens - 1) // self.block_size))

    def cache_computed(self, req: Request) -> None:
        """Offer req's newly computed full blocks to the prefix cache."""
        if self.hash_seed is None:
            return
        full = min(req.num_computed_tokens // self.block_size, len(req.block_ids))
        if full > req.num_cached_blocks:
            hs = self.hashes(req, full)
            for i in range(req.num_cached_blocks, full):
                self.pool.cache(req.block_ids[i], hs[i])
            req.num_cached_blocks = full

    # ----- the decision --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:  # nothing to compute (cannot happen for a running request, but never spin on it)
                i += 1
                continue
            if not self._grow(req, n, out):
                break  # req itself was preempted: everything after it already was
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
            i += 1

        if out.preempted:
            return out  # blocks are short: admit nobody new this step

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hit = self._cached_prefix(req)
            need = max(0, blocks_for(req.num_tokens, self.block_size) - len(req.block_ids) - len(hit))  # whole prompt
            take = need + self.pool.num_to_take(hit)                  # reusing an evictable block takes it too
            if not self.pool.can_allocate(take + len(self.running)):   # + a block for each running one to grow into
                break  # head of line waits; later arrivals do not overtake it
            if hit:
                self.pool.acquire(hit)
                req.block_ids = list(hit)
                req.num_cached_blocks = len(hit)
                req.num_computed_tokens = len(hit) * self.block_size
            req.num_cached_tokens = len(hit) * self.block_size
            if self.hash_seed is not None:
                self.prefix_query_tokens += req.num_tokens
                self.prefix_hit_tokens += req.num_cached_tokens
            req.block_ids += self.pool.allocate(need)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            self.waiting.pop(0)
            self.add_running(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
        return out

    def _grow(self, req: Request, n: int, out: SchedulerOutput) -> bool:
        """Give req blocks for n more tokens, preempting from the back of the batch. False if req was preempted."""
        need = max(0, blocks_for(req.num_computed_tokens + n, self.block_size) - len(req.block_ids))
        while not self.pool.can_allocate(need):
            victim = self.running[-1]
            self.preempt(victim)
            out.preempted.append(victim)
            if victim is req:
                return False
        req.block_ids += self.pool.allocate(need)
        return True

    def preempt(self, req: Request) -> None:
        """Free a running request's blocks and queue it again, to be recomputed from its first token."""
        self.running.remove(req)
        self.free_blocks(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.add(req)

    # ----- what load reports need ----------------------------------------------------------------------------
    def blocks_demanded(self, req: Request) -> int:
        """Blocks req needs to finish its prefill from where it is."""
        return max(0, blocks_for(req.num_tokens + 1, self.block_size) - len(req.block_ids))


def _insert_sorted(queue: list[Request], req: Request) -> None:
    key = req.sort_key()
    lo, hi = 0, len(queue)
    while lo < hi:
        mid = (lo + hi) // 2
        if queue[mid].sort_key() <= key:
            lo = mid + 1
        else:
            hi = mid
    queue.insert(lo, req)


def load_snapshot(sched: "Scheduler", pool: BlockPool, requests, block_size: int, now: float,
                  step_time_ms: float = 0.0, tokens_per_s: float = 0.0, digest_limit: int = 0) -> LoadSnapshot:
    """The load of an engine (or a simulated one) whose batch `sched` schedules over `pool`; `requests` are all
    the requests it holds, suspended ones included; `now` on the clock of the requests' arrival times."""
    head = sched.waiting[0] if sched.waiting else None
    return LoadSnapshot(
        total_blocks=pool.num_blocks, free_blocks=pool.num_free, used_blocks=pool.num_used,
        reserved_blocks=pool.num_reserved, block_size=block_size,
        num_running=len(sched.running), num_waiting=len(sched.waiting),
        num_preempted=sum(1 for r in sched.waiting if r.num_preemptions > 0),
        num_suspended=sum(1 for r in requests if r.status is RequestStatus.SUSPENDED),
        head_demand_blocks=sched.blocks_demanded(head) if head else 0,
        waiting_demand_blocks=sum(sched.blocks_demanded(r) for r in sched.waiting),
        running_tokens=sum(r.num_tokens for r in sched.running),
        step_time_ms=step_time_ms, tokens_per_s=tokens_per_s,
        num_preemptions_total=sched.num_preemptions_total,
        num_high_priority=sum(1 for q in (sched.running, sched.waiting) for r in q if r.priority > 0),
        head_wait_s=max(0.0, now - head.arrival_time) if head else 0.0,
        remaining_output_tokens=sum(max(0, r.params.max_tokens - r.num_output_tokens)
                                    for q in (sched.running, sched.waiting) for r in q),
        prefill_backlog_tokens=sum(max(0, r.num_tokens - r.num_computed_tokens - 1)
                                   for q in (sched.running, sched.waiting) for r in q),
        cached_blocks=pool.num_cached, prefix_hit_tokens=sched.prefix_hit_tokens,
        prefix_query_tokens=sched.prefix_query_tokens,
        cached_prefixes=pool.digest(digest_limit) if digest_limit else (),
    )
