"""The native engine: continuous batching over a paged KV cache, with the hooks live migration needs.

Decide, execute, reconcile: the scheduler returns a plain decision, the model runner runs it, and
`_update` applies the sampled tokens. The engine never imports Ray; `InstanceActor` wraps it.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque

from instance.backend import EngineBackend, LoadSnapshot, RequestInfo
from instance.config import EngineConfig
from instance.kv_cache import BlockPool, KVCacheTensors, OutOfBlocksError
from instance.model.loader import load_model
from instance.model_runner import ModelRunner
from instance.request import Detokenizer, FinishReason, Request, RequestOutput, RequestState, RequestStatus
from instance.sampling import InvalidRequestError, SamplingParams, validate_request
from instance.scheduler import Scheduler, blocks_for, load_snapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN_CAP = 8192
_STATS_WINDOW = 32


class UnknownRequestError(KeyError):
    """No request with this id is on this engine."""


class Engine(EngineBackend):
    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig(**overrides)
        self.config = config
        loaded = load_model(config)
        self.model_name = loaded.name
        self.tokenizer = loaded.tokenizer
        arch = loaded.model.arch
        self.arch = arch
        dtype = config.torch_dtype()
        per_block = KVCacheTensors.bytes_per_block(arch.num_layers, config.block_size, arch.num_kv_heads,
                                                   arch.head_dim, dtype)
        num_blocks = config.num_blocks or int(config.kv_cache_gib * 2**30 // per_block)
        capacity = num_blocks * config.block_size
        self.max_model_len = config.max_model_len or min(arch.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)
        if config.max_model_len is None and capacity < self.max_model_len:
            log.warning("max_model_len lowered from %d to %d tokens, what the KV cache holds; raise kv_cache_gib "
                        "for longer contexts", self.max_model_len, capacity)
            self.max_model_len = capacity
        if capacity < self.max_model_len:
            raise ValueError(
                f"kv_cache: {num_blocks} blocks of {config.block_size} tokens hold "
                f"{num_blocks * config.block_size} tokens, fewer than max_model_len {self.max_model_len}; "
                f"raise kv_cache_gib / num_blocks or lower max_model_len")
        self.pool = BlockPool(num_blocks)
        self.kv = KVCacheTensors(arch.num_layers, num_blocks, config.block_size, arch.num_kv_heads,
                                 arch.head_dim, dtype, config.device)
        self.scheduler = Scheduler(self.pool, config.block_size, config.max_num_batched_tokens,
                                   config.max_num_seqs)
        self.runner = ModelRunner(loaded.model, self.kv, config.device)
        self.requests: dict[str, Request] = {}
        self._eos = frozenset(self.tokenizer.eos_token_ids)
        self._seed_rng = random.Random(config.seed)
        self._steps: deque[tuple[float, float, int]] = deque(maxlen=_STATS_WINDOW)  # (end, seconds, tokens)
        log.info("engine ready: model %s on %s, %d KV blocks x %d tokens (%.2f GiB), max_model_len %d",
                 self.model_name, config.device, num_blocks, config.block_size, num_blocks * per_block / 2**30,
                 self.max_model_len)

    # ----- requests ------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use on this engine")
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer.encode(prompt) if prompt else []
        ids = self.validate(list(prompt_token_ids), params, priority)
        req = Request(
            request_id=request_id, token_ids=ids, num_prompt_tokens=len(ids), params=params,
            seed=params.seed if params.seed is not None else self._seed_rng.getrandbits(63),
            priority=priority, arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            detok=Detokenizer(self.tokenizer.token_bytes, params.stop), eos_token_ids=self._eos,
            max_model_len=self.max_model_len)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> list[int]:
        """Check a request's inputs; raise InvalidRequestError naming the field and the limit."""
        validate_request(prompt_token_ids, params, priority, self.arch.vocab_size, self.max_model_len)
        return prompt_token_ids

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks. False if it is not here (already finished)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        self.scheduler.free_blocks(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = FinishReason.ABORT
        log.debug("aborted %s", request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # ----- one step --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return []
        start = time.perf_counter()
        sampled = self.runner.execute(sched)
        elapsed = time.perf_counter() - start
        for chunk in sched.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
        sampling = [c.request for c in sched.chunks if c.request.num_computed_tokens == c.request.num_tokens]
        for req, token in zip(sampling, sampled, strict=True):
            req.append_token(token)
        self._steps.append((time.monotonic(), elapsed, sched.num_tokens))
        outputs = []
        for req in sampling:
            outputs.append(req.take_output())
            if req.is_finished:
                self._finish(req)
        return outputs

    def _finish(self, req: Request) -> None:
        self.scheduler.remove(req)
        self.scheduler.free_blocks(req)
        del self.requests[req.request_id]

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None,
                 max_steps: int = 100_000) -> list[RequestOutput]:
        """Run prompts to completion (for tests and benchmarks). Returns one summary output per prompt."""
        ids = [f"gen-{i}-{self._seed_rng.getrandbits(32):08x}" for i in range(len(prompts))]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        text: dict[str, str] = {i: "" for i in ids}
        final: dict[str, RequestOutput] = {}
        for rid, p in zip(ids, prompts):
            if isinstance(p, str):
                self.add_request(rid, prompt=p, params=params)
            else:
                self.add_request(rid, prompt_token_ids=list(p), params=params)
        for _ in range(max_steps):
            if len(final) == len(ids):
                break
            for out in self.step():
                tokens[out.request_id] += out.new_token_ids
                text[out.request_id] += out.text_delta
                if out.finished:
                    final[out.request_id] = out
        else:
            raise TimeoutError(f"generate did not finish in {max_steps} steps")
        return [RequestOutput(i, tokens[i], text[i], True, final[i].finish_reason, final[i].num_prompt_tokens,
                              final[i].num_output_tokens) for i in ids]

    # ----- load ------------------------------------------------------------------------------------------------
    def load(self) -> LoadSnapshot:
        now = time.monotonic()
        recent = [st for st in self._steps if now - st[0] < 5.0]
        busy = sum(st[1] for st in recent)
        generated = sum(st[2] for st in recent)
        return load_snapshot(self.scheduler, self.pool, self.requests.values(), self.config.block_size,
                             step_time_ms=1000.0 * busy / len(recent) if recent else 0.0,
                             tokens_per_s=generated / busy if busy > 0 else 0.0)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held = [b for r in self.requests.values() for b in r.block_ids]
        if len(held) != len(set(held)):
            raise AssertionError("two requests hold the same block")
        if len(held) != self.pool.num_used:
            raise AssertionError(f"requests hold {len(held)} blocks but the pool counts {self.pool.num_used} used")
        queued = self.scheduler.running + self.scheduler.waiting
        if len({id(r) for r in queued}) != len(queued):
            raise AssertionError("a request is queued twice")
        for r in self.requests.values():
            in_queue = r in queued
            if in_queue == (r.status is RequestStatus.SUSPENDED):
                raise AssertionError(f"request {r.request_id} is {r.status.value} but queued={in_queue}")
            if len(r.block_ids) < blocks_for(r.num_computed_tokens, self.config.block_size):
                raise AssertionError(f"request {r.request_id} has fewer blocks than its computed tokens need")

    def request_info(self, request_id: str, with_blocks: bool = False) -> RequestInfo | None:
        req = self.requests.get(request_id)
        if req is None:
            return None
        return RequestInfo(request_id=req.request_id, status=req.status.value, num_tokens=req.num_tokens,
                           num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
                           max_tokens=req.params.max_tokens, num_computed_tokens=req.num_computed_tokens,
                           priority=req.priority, num_preemptions=req.num_preemptions,
                           block_ids=tuple(req.block_ids) if with_blocks else ())

    def list_requests(self) -> list[RequestInfo]:
        return [self.request_info(rid) for rid in self.requests]

    # ----- migration hooks ---------------------------------------------------------------------------------
    def _get(self, request_id: str) -> Request:
        try:
            return self.requests[request_id]
        except KeyError:
            raise UnknownRequestError(request_id) from None

    def get_block_ids(self, request_id: str) -> list[int]:
        return list(self._get(request_id).block_ids)

    def num_computed_tokens(self, request_id: str) -> int:
        return self._get(request_id).num_computed_tokens

    def export_blocks(self, block_ids: list[int]):
        return self.kv.export_blocks(block_ids)

    def reserve_blocks(self, n: int) -> list[int]:
        if not self.pool.can_allocate(n):
            raise OutOfBlocksError(f"cannot reserve {n} blocks: {self.pool.num_free} free")
        return self.pool.reserve(n)

    def import_blocks(self, block_ids: list[int], blocks) -> None:
        if not all(self.pool.is_reserved(b) for b in block_ids):
            raise ValueError("import_blocks: blocks must be reserved with reserve_blocks first")
        self.kv.import_blocks(block_ids, blocks)

    def release_reserved(self, block_ids: list[int]) -> None:
        self.pool.release_reserved(block_ids)

    def suspend(self, request_id: str) -> RequestState:
        """Take a request out of the batch between two steps. Its blocks stay until `free_suspended`."""
        req = self._get(request_id)
        if req.status is RequestStatus.SUSPENDED:
            return req.to_state()
        self.scheduler.remove(req)
        req.status = RequestStatus.SUSPENDED
        return req.to_state()

    def resume(self, request_id: str) -> None:
        """Put a suspended request back (its migration was aborted)."""
        req = self._get(request_id)
        if req.status is not RequestStatus.SUSPENDED:
            return
        if req.num_computed_tokens > 0:
            self.scheduler.add_running(req)
        else:
            self.scheduler.add(req)

    def free_suspended(self, request_id: str) -> None:
        """The request now lives elsewhere: forget it and free its blocks."""
        req = self._get(request_id)
        if req.status is not RequestStatus.SUSPENDED:
            raise ValueError(f"request {request_id} is {req.status.value}, not suspended")
        self.scheduler.free_blocks(req)
        del self.requests[request_id]

    def resume_from_tokens(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                           params: SamplingParams, seed: int, priority: int, text_emitted: int) -> None:
        """Take over a request whose instance died: recompute prompt + the tokens its client already has, then
        go on from output token len(output_token_ids) with the same seeded draws, as if nothing happened."""
        ids = list(prompt_token_ids) + list(output_token_ids)
        self.validate(list(prompt_token_ids), params, priority)
        detok = Detokenizer(self.tokenizer.token_bytes, params.stop)
        for t in output_token_ids:
            detok.push(t)
        state = RequestState(
            request_id=request_id, token_ids=ids, num_prompt_tokens=len(prompt_token_ids), num_computed_tokens=0,
            params=params, seed=seed, sample_index=len(output_token_ids), priority=priority,
            arrival_time=time.monotonic(), text=detok.text, text_emitted=min(text_emitted, len(detok.text)),
            pending_bytes=detok.pending)
        self.admit_migrated(state, [])

    def admit_migrated(self, state: RequestState, block_ids: list[int]) -> None:
        """Adopt a request whose first `num_computed_tokens` tokens of KV were imported into `block_ids`."""
        if state.request_id in self.requests:
            raise InvalidRequestError("request_id", f"{state.request_id!r} is already on this engine")
        if state.sample_index != len(state.token_ids) - state.num_prompt_tokens:
            raise ValueError("request state: sample_index must equal the number of output tokens")
        if len(block_ids) < blocks_for(state.num_computed_tokens, self.config.block_size):
            raise ValueError(f"request state: {state.num_computed_tokens} computed tokens need more than "
                             f"{len(block_ids)} blocks")
        self.pool.commit_reserved(block_ids)
        p = state.params
        req = Request(
            request_id=state.request_id, token_ids=list(state.token_ids), num_prompt_tokens=state.num_prompt_tokens,
            params=p, seed=state.seed, priority=state.priority, arrival_time=state.arrival_time,
            detok=Detokenizer(self.tokenizer.token_bytes, p.stop, state.text, state.text_emitted,
                              state.pending_bytes),
            eos_token_ids=self._eos, max_model_len=self.max_model_len,
            num_computed_tokens=state.num_computed_tokens, block_ids=list(block_ids),
            num_preemptions=state.num_preemptions)
        self.requests[req.request_id] = req
        if req.num_computed_tokens > 0:
            self.scheduler.add_running(req)
        else:
            self.scheduler.add(req)
