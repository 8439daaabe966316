"""The part of an engine that holds no tensors: its requests, the batch scheduler, the block pool, and the
migration hooks that move block ids and request state.

`EngineCore` decides and reconciles; something else executes. The native engine (`instance/engine.py`) pairs it
with a model runner over a KV-cache tensor, the simulator (`orchestrator/sim/instance.py`) with a cost model
that says how long a step takes; both run the same admission, chunking, preemption, load reports and
migration bookkeeping, so what the simulator measures is what the engine does.

    sched = core.schedule()                  # decide: a plain SchedulerOutput of block ids and counters
    sampled = <execute sched>                # one token per chunk that reaches its request's last token
    outputs = core.update(sched, sampled)    # reconcile: append tokens, finish requests, free their blocks

Migration, request by request: the source `suspend`s a request between two steps (it leaves the batch and
keeps its blocks), then `free_suspended` once the destination committed, or `resume`s it if the move failed.
The destination collects a request's blocks in an *import*: `reserve_import` (as often as the pre-copy stages
need), the blocks written into `import_block_ids`, then `commit_import` adopts the request with them, or
`cancel_import` gives them back. With prefix caching, an import may first take the leading blocks the
destination already caches (`attach_import_prefix`): those are not copied.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Callable

from instance.backend import LoadSnapshot, RequestInfo, UnknownRequestError
from instance.kv_cache import BlockPool, OutOfBlocksError, block_hashes, blocks_for
from instance.request import Detokenizer, FinishReason, Request, RequestOutput, RequestState, RequestStatus
from instance.sampling import InvalidRequestError, SamplingParams, validate_request
from instance.scheduler import Scheduler, SchedulerOutput, load_snapshot


class EngineCore:
    def __init__(self, num_blocks: int, block_size: int, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, vocab_size: int, token_bytes: Callable[[int], bytes],
                 eos_token_ids: frozenset[int] = frozenset(), seed: int = 0,
                 clock: Callable[[], float] = time.time, prefix_cache_seed: str | None = None,
                 digest_limit: int = 0):
        """`clock`: when requests arrive and how long the queue's head has waited; the wall clock, so a request
        moved to another node keeps its place in the queue (the simulator passes its own).
        `prefix_cache_seed`: names the model in prefix-cache hashes (None: prefix caching off);
        `digest_limit`: how many cached block hashes a load report carries at most."""
        self.clock = clock
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.pool = BlockPool(num_blocks, caching=prefix_cache_seed is not None)
        self.scheduler = Scheduler(self.pool, block_size, max_num_batched_tokens, max_num_seqs,
                                   hash_seed=prefix_cache_seed)
        self.digest_limit = digest_limit
        self.requests: dict[str, Request] = {}
        self._imports: dict[str, list[int]] = {}      # import id -> its blocks, in request order
        self._import_prefix: dict[str, int] = {}      # import id -> leading blocks of those found cached here
        self.num_computed_total = 0                   # tokens computed by all steps (prefill and decode)
        self._token_bytes = token_bytes
        self._eos = eos_token_ids
        self._seed_rng = random.Random(seed)

    # ----- requests ------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> list[int]:
        """Check a request's inputs; raise InvalidRequestError naming the field and the limit."""
        validate_request(prompt_token_ids, params, priority, self.vocab_size, self.max_model_len)
        return prompt_token_ids

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
                    arrival_time: float | None = None) -> Request:
        if not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use on this engine")
        ids = self.validate(list(prompt_token_ids), params, priority)
        req = Request(
            request_id=request_id, token_ids=ids, num_prompt_tokens=len(ids), params=params,
            seed=params.seed if params.seed is not None else self._seed_rng.getrandbits(63),
            priority=priority, arrival_time=self.clock() if arrival_time is None else arrival_time,
            detok=Detokenizer(self._token_bytes, params.stop), eos_token_ids=self._eos,
            max_model_len=self.max_model_len)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if it is not here (already finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        self.scheduler.free_blocks(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ABORT
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # ----- one step: decide, then reconcile what was executed ------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def update(self, sched: SchedulerOutput, sampled: list[int]) -> list[RequestOutput]:
        """Apply an executed step: `sampled` holds one token per chunk that reached its request's last token,
        in chunk order. Returns an output per request that got a token; finished requests are gone after."""
        for chunk in sched.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            self.num_computed_total += chunk.num_tokens
            self.scheduler.cache_computed(chunk.request)
        sampling = [c.request for c in sched.chunks if c.request.num_computed_tokens == c.request.num_tokens]
        outputs = []
        for req, token in zip(sampling, sampled, strict=True):
            req.append_token(token)
            outputs.append(req.take_output())
            if req.is_finished:
                self.scheduler.remove(req)
                self.scheduler.free_blocks(req)
                del self.requests[req.request_id]
        return outputs

    # ----- what the control plane sees -----------------------------------------------------------------------
    def load(self, step_time_ms: float = 0.0, tokens_per_s: float = 0.0) -> LoadSnapshot:
        return load_snapshot(self.scheduler, self.pool, self.requests.values(), self.block_size, self.clock(),
                             step_time_ms=step_time_ms, tokens_per_s=tokens_per_s, digest_limit=self.digest_limit)

    def request_info(self, request_id: str) -> RequestInfo | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        return RequestInfo(request_id=req.request_id, status=req.status.value, num_tokens=req.num_tokens,
                           num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
                           max_tokens=req.params.max_tokens, num_computed_tokens=req.num_computed_tokens,
                           priority=req.priority, num_preemptions=req.num_preemptions)

    def list_requests(self) -> list[RequestInfo]:
        """Every request held here (running, waiting, suspended), in arrival order."""
        return [self.request_info(rid) for rid in self.requests]

    def check_integrity(self) -> None:
        """Raise AssertionError unless the pool balances and every block's reference count is its holders:
        requests, and imports in progress (a block a request has only once; only cached blocks are shared)."""
        self.pool.check_integrity()
        holders: Counter[int] = Counter()
        for r in self.requests.values():
            if len(r.block_ids) != len(set(r.block_ids)):
                raise AssertionError(f"request {r.request_id} holds a block twice")
            holders.update(r.block_ids)
        for iid, ids in self._imports.items():
            holders.update(ids[:self._import_prefix.get(iid, 0)])
        wrong = [b for b in range(self.pool.num_blocks) if holders[b] != self.pool.ref_count(b)]
        if wrong:
            b = wrong[0]
            raise AssertionError(f"{len(wrong)} blocks have references that are not their holders (block {b}: "
                                 f"{holders[b]} holders, {self.pool.ref_count(b)} references)")
        shared = [b for b, n in holders.items() if n > 1 and not self.pool.is_cached(b)]
        if shared:
            raise AssertionError(f"blocks {shared[:8]} are held twice but not cached")
        importing = [b for iid, ids in self._imports.items() for b in ids[self._import_prefix.get(iid, 0):]]
        if len(importing) != len(set(importing)) or len(importing) != self.pool.num_reserved \
                or not all(self.pool.is_reserved(b) for b in importing):
            raise AssertionError(f"imports hold {len(importing)} blocks but the pool counts "
                                 f"{self.pool.num_reserved} reserved")
        queued = self.scheduler.running + self.scheduler.waiting
        if len({id(r) for r in queued}) != len(queued):
            raise AssertionError("a request is queued twice")
        for r in self.requests.values():
            in_queue = r in queued
            if in_queue == (r.status is RequestStatus.SUSPENDED):
                raise AssertionError(f"request {r.request_id} is {r.status.value} but queued={in_queue}")
            if len(r.block_ids) < blocks_for(r.num_computed_tokens, self.block_size):
                raise AssertionError(f"request {r.request_id} has fewer blocks than its computed tokens need")
            if self.scheduler.hash_seed is not None:
                hs = self.scheduler.hashes(r, min(r.num_cached_blocks, r.num_computed_tokens // self.block_size))
                bad = [i for i, h in enumerate(hs) if self.pool.is_cached(r.block_ids[i])
                       and self.pool.hash_of(r.block_ids[i]) != h]
                if bad:
                    raise AssertionError(f"request {r.request_id}: block {bad[0]} is cached under another prefix")

    # ----- migration: the source half ------------------------------------------------------------------------
    def get(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except KeyError:
            raise UnknownRequestError(request_id) from None

    def prefix_hashes(self, request_id: str, n: int) -> list[int]:
        """Prefix-cache hashes of the request's first n full blocks, at most those computed; [] with caching
        off (what a migration asks its destination for, to copy only the blocks it lacks)."""
        req = self.get(request_id)
        if self.scheduler.hash_seed is None:
            return []
        return self.scheduler.hashes(req, min(n, req.num_computed_tokens // self.block_size))

    def block_ids(self, request_id: str, start: int, end: int) -> list[int]:
        """The request's blocks start..end-1 (in token order). Safe beside a running step for full blocks: a
        step only appends to a request's blocks (or, when it preempts it, drops them all)."""
        return self.get(request_id).block_ids[start:end]

    def suspend(self, request_id: str) -> RequestState:
        """Take a request out of the batch between two steps. Its blocks stay until `free_suspended`."""
        req = self.get(request_id)
        if req.status is not RequestStatus.SUSPENDED:
            self.scheduler.remove(req)
            req.status = RequestStatus.SUSPENDED
        return req.to_state()

    def resume(self, request_id: str) -> None:
        """Put a suspended request back (its migration was aborted)."""
        req = self.get(request_id)
        if req.status is RequestStatus.SUSPENDED:
            self._enqueue(req)

    def free_suspended(self, request_id: str) -> None:
        """The request now lives elsewhere: forget it and free its blocks."""
        req = self.get(request_id)
        if req.status is not RequestStatus.SUSPENDED:
            raise ValueError(f"request {request_id} is {req.status.value}, not suspended")
        self.scheduler.free_blocks(req)
        del self.requests[request_id]

    # ----- migration: the destination half -------------------------------------------------------------------
    def attach_import_prefix(self, import_id: str, hashes: list[int]) -> int:
        """Begin an import with the leading blocks of `hashes` (the request's full-block hashes) that are cached
        here: the import holds them, nothing is copied into them. Returns how many; 0 with caching off."""
        if import_id in self._imports:
            raise ValueError(f"import {import_id}: already begun; a cached prefix can only start it")
        hit = self.pool.cached_prefix(hashes)
        if hit:
            self.pool.acquire(hit)
            self._imports[import_id] = list(hit)
            self._import_prefix[import_id] = len(hit)
        return len(hit)

    def reserve_import(self, import_id: str, num_blocks: int) -> int:
        """Set `num_blocks` more free blocks aside for the request an import brings; the first call begins the
        import. Returns the index (within the request) of the first new block. OutOfBlocksError if too few are
        free; the import then keeps what it had."""
        if not self.pool.can_allocate(num_blocks):
            raise OutOfBlocksError(f"cannot reserve {num_blocks} blocks: {self.pool.num_free} free")
        held = self._imports.setdefault(import_id, [])
        first = len(held)
        held += self.pool.reserve(num_blocks)
        return first

    def import_block_ids(self, import_id: str, first: int, n: int) -> list[int]:
        """Where blocks first..first+n-1 of an import go. Reserved blocks belong to no running request, so they
        may be written beside a running step."""
        held = self._imports.get(import_id)
        if held is None:
            raise ValueError(f"import {import_id}: nothing reserved for it")
        cached = self._import_prefix.get(import_id, 0)
        if first < cached or first + n > len(held):
            raise ValueError(f"import {import_id}: blocks {first}..{first + n - 1} were not reserved "
                             f"(blocks {cached}..{len(held) - 1} were)")
        return held[first:first + n]

    def commit_import(self, import_id: str, state: RequestState) -> None:
        """Adopt the request whose first `num_computed_tokens` tokens of KV were written into the import's
        blocks (an import of a waiting request may hold no blocks at all)."""
        if state.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{state.request_id!r} is already on this engine")
        if state.sample_index != len(state.token_ids) - state.num_prompt_tokens:
            raise ValueError("request state: sample_index must equal the number of output tokens")
        held = self._imports.get(import_id, [])
        if len(held) < blocks_for(state.num_computed_tokens, self.block_size):
            raise ValueError(f"request state: {state.num_computed_tokens} computed tokens need more than "
                             f"{len(held)} blocks")
        cached = self._import_prefix.get(import_id, 0)
        if cached:
            if cached * self.block_size > state.num_computed_tokens:
                raise ValueError(f"request state: {state.num_computed_tokens} computed tokens, fewer than the "
                                 f"{cached} cached blocks the import began with")
            expected = block_hashes(list(state.token_ids[:cached * self.block_size]), self.block_size,
                                    self.scheduler.hash_seed)
            if [self.pool.hash_of(b) for b in held[:cached]] != expected:
                raise ValueError("request state: its tokens are not the prefix the import found cached")
        self.pool.commit_reserved(held[cached:])
        self._imports.pop(import_id, None)
        self._import_prefix.pop(import_id, None)
        self._adopt(state, held)

    def cancel_import(self, import_id: str) -> None:
        """Give an import's reserved blocks back (its migration was aborted). No error if there is none."""
        held = self._imports.pop(import_id, None)
        cached = self._import_prefix.pop(import_id, 0)
        if held:
            self.pool.free(held[:cached])
            self.pool.release_reserved(held[cached:])

    # ----- failover ------------------------------------------------------------------------------------------
    def resume_from_tokens(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                           params: SamplingParams, seed: int, priority: int, text_emitted: int) -> None:
        """Take over a request whose instance died: recompute prompt + the tokens its client already has, then
        go on from output token len(output_token_ids) with the same seeded draws, as if nothing happened."""
        self.validate(list(prompt_token_ids), params, priority)
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already on this engine")
        detok = Detokenizer(self._token_bytes, params.stop)
        for t in output_token_ids:
            detok.push(t)
        self._adopt(RequestState(
            request_id=request_id, token_ids=list(prompt_token_ids) + list(output_token_ids),
            num_prompt_tokens=len(prompt_token_ids), num_computed_tokens=0, params=params, seed=seed,
            sample_index=len(output_token_ids), priority=priority, arrival_time=self.clock(), text=detok.text,
            text_emitted=min(text_emitted, len(detok.text)), pending_bytes=detok.pending), [])

    def _adopt(self, state: RequestState, block_ids: list[int]) -> None:
        p = state.params
        req = Request(
            request_id=state.request_id, token_ids=list(state.token_ids), num_prompt_tokens=state.num_prompt_tokens,
            params=p, seed=state.seed, priority=state.priority, arrival_time=state.arrival_time,
            detok=Detokenizer(self._token_bytes, p.stop, state.text, state.text_emitted, state.pending_bytes),
            eos_token_ids=self._eos, max_model_len=self.max_model_len,
            num_computed_tokens=state.num_computed_tokens, block_ids=list(block_ids),
            num_preemptions=state.num_preemptions)
        self.requests[req.request_id] = req
        self.scheduler.cache_computed(req)           # what it brought is cached here too
        self._enqueue(req)

    def _enqueue(self, req: Request) -> None:
        """Into the batch if it holds computed KV, else into the waiting queue."""
        if req.num_computed_tokens > 0:
            self.scheduler.add_running(req)
        else:
            self.scheduler.add(req)
