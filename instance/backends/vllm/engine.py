"""`VllmBackend`: an in-process vLLM `LLMEngine` behind Tidal's `EngineBackend`.

vLLM schedules, batches and runs the model; Tidal keeps, per request, what the client sees: its tokens, the
detokenizer (text deltas, stop strings), finish reasons and its seeded draws (`sampler.py`), so a stream reads
the same from either backend. vLLM is asked only for token ids: no detokenization, EOS ignored, max_tokens
the request's remaining budget; Tidal decides when a request stops and aborts it in vLLM then.

Live migration over the KV connector (`connector.py`), request-centred as the interface says:

- source: `export_blocks` reads the request's blocks by vLLM's own block ids; `suspend` aborts the request in
  vLLM while the connector keeps its blocks (`request_finished` → True); `free_suspended` frees them once the
  destination committed; `resume` re-adds the request with those blocks copied into new ones (no recompute),
  and the old ones go after the copy;
- destination: `reserve_import` sets blocks aside *in Tidal's books* (vLLM cannot reserve blocks outside a
  request, so the reservation is checked against vLLM's free blocks and reported in the load, and the blocks
  arrive in host memory); `commit_import` adds the request to vLLM with its whole token list, and the
  connector loads the staged KV into the blocks vLLM allocates, so only the last token is computed.

Every vLLM internal this touches is in `internals.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from instance.backend import EngineBackend, LoadSnapshot, RequestInfo, UnknownRequestError
from instance.config import EngineConfig
from instance.kv_cache import OutOfBlocksError, blocks_for
from instance.limits import MAX_MODEL_LEN_CAP
from instance.request import Detokenizer, FinishReason, Request, RequestOutput, RequestState, RequestStatus
from instance.sampling import InvalidRequestError, SamplingParams, validate_request

log = logging.getLogger(__name__)

CPU_BLOCK_MULTIPLE = 32          # vLLM's CPU attention takes block sizes that are multiples of 32
_STATS_WINDOW = 32


def _prepare_environment() -> None:
    """vLLM reads these when it is imported or builds an engine: the engine core in this process (an actor
    steps it itself), and no OpenMP thread binding of its own (instances share the machine's cores; torch's
    thread count, set by the actor, applies)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


@dataclass
class _Entry:
    """One Tidal request on this engine and the vLLM request that serves it now (a request is re-added to
    vLLM, under a new id, when it resumes or arrives by migration)."""

    req: Request
    external_id: str = ""          # the id vLLM's outputs carry
    vllm_id: str = ""              # the id vLLM's scheduler keys it by
    admissions: int = 0
    suspended: bool = False
    computed_at_suspend: int = 0
    preemptions_before: int = 0    # preemptions under earlier vLLM requests (and engines)
    preemptions_counted: int = 0   # of the current vLLM request's, already in the engine's total


@dataclass
class _Import:
    num_blocks: int = 0                                       # reserved so far
    chunks: dict[int, torch.Tensor] = field(default_factory=dict)   # first block index -> blocks


class VllmBackend(EngineBackend):
    kind = "vllm"

    def __init__(self, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig(backend="vllm", **overrides)
        self.block_size = self._block_size(config)
        _prepare_environment()
        from vllm import EngineArgs
        from vllm.config import KVTransferConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        from instance.backends.vllm import connector, internals
        from instance.backends.vllm.sampler import TidalSampler
        from instance.model.hf_export import hf_dir_for
        from instance.model.loader import load_tokenizer

        self.config = config
        model_dir = hf_dir_for(config.model)
        self.tokenizer = load_tokenizer(config.model)
        self.model_name = config.model if not os.path.isdir(config.model) else os.path.basename(config.model)
        hf_config = _read_json(model_dir / "config.json")
        self.vocab_size = int(hf_config["vocab_size"])
        self.max_model_len = config.max_model_len or min(int(hf_config.get("max_position_embeddings", 2048)),
                                                         MAX_MODEL_LEN_CAP)
        self._key = f"tidal-{uuid.uuid4().hex[:12]}"
        self._shared = connector.shared_for(self._key)
        self._internals = internals
        dtype = "float32" if config.dtype == "auto" and config.device == "cpu" else (
            "bfloat16" if config.dtype == "auto" else config.dtype)
        args = EngineArgs(
            model=str(model_dir), tokenizer=str(model_dir), skip_tokenizer_init=True, dtype=dtype,
            enforce_eager=True, block_size=self.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, self.block_size),
            enable_prefix_caching=False, seed=config.seed, scheduling_policy="priority",
            num_gpu_blocks_override=(config.num_blocks + 1) if config.num_blocks else None,
            kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
            logits_processors=[TidalSampler],
            kv_transfer_config=KVTransferConfig(
                kv_connector="TidalKVConnector", kv_connector_module_path=connector.__name__,
                kv_role="kv_both", kv_connector_extra_config={connector.EXTRA_KEY: self._key}),
            disable_log_stats=True,
        )
        start = time.perf_counter()
        previous = internals.swap_worker_connector(None)     # so this engine gets a worker connector of its own
        try:
            self.llm = LLMEngine.from_engine_args(args)
        finally:
            self._worker_connector = internals.swap_worker_connector(previous)
        self._sched = internals.scheduler(self.llm)
        self.num_blocks = internals.num_total_blocks(self._sched)
        if self.num_blocks * self.block_size < self.max_model_len:
            raise ValueError(f"kv_cache: {self.num_blocks} blocks of {self.block_size} tokens hold fewer than "
                             f"max_model_len {self.max_model_len}; raise kv_cache_gib / num_blocks")
        self._entries: dict[str, _Entry] = {}            # Tidal request id -> entry (arrival order)
        self._by_external: dict[str, _Entry] = {}
        self._imports: dict[str, _Import] = {}
        self._seed_rng = random.Random(config.seed)
        self._preemptions_total = 0
        self._steps: deque[tuple[float, float, int]] = deque(maxlen=_STATS_WINDOW)
        log.info("vLLM engine ready in %.1f s: %s from %s, %d KV blocks x %d tokens, max_model_len %d",
                 time.perf_counter() - start, self.model_name, model_dir, self.num_blocks, self.block_size,
                 self.max_model_len)

    @staticmethod
    def _block_size(config: EngineConfig) -> int:
        if config.device == "cpu" and config.block_size % CPU_BLOCK_MULTIPLE:
            raise ValueError(f"block_size: vLLM's CPU attention needs a multiple of {CPU_BLOCK_MULTIPLE}, got "
                             f"{config.block_size}; pass --block-size {CPU_BLOCK_MULTIPLE} (or leave it unset)")
        return config.block_size

    def close(self) -> None:
        """Free the engine (tests that build several)."""
        from instance.backends.vllm import connector

        connector.forget(self._key)
        self.llm = None

    # ----- requests ------------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> list[int]:
        validate_request(prompt_token_ids, params, priority, self.vocab_size, self.max_model_len)
        return prompt_token_ids

    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: SamplingParams | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if prompt_token_ids is None:
            prompt_token_ids = self.tokenizer.encode(prompt) if prompt else []
        self._check_new_id(request_id)
        ids = self.validate(list(prompt_token_ids), params, priority)
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(63)
        req = self._request(request_id, ids, len(ids), params, seed, priority,
                            time.time() if arrival_time is None else arrival_time)
        self._admit(_Entry(req))

    def resume_from_tokens(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                           params: SamplingParams, seed: int, priority: int, text_emitted: int) -> None:
        self.validate(list(prompt_token_ids), params, priority)
        self._check_new_id(request_id)
        detok = Detokenizer(self.tokenizer.token_bytes, params.stop)
        for t in output_token_ids:
            detok.push(t)
        detok.emitted = min(text_emitted, len(detok.text))
        req = self._request(request_id, list(prompt_token_ids) + list(output_token_ids), len(prompt_token_ids),
                            params, seed, priority, time.time(), detok)
        self._admit(_Entry(req))                      # vLLM recomputes prompt + outputs: a re-prefill

    def abort(self, request_id: str) -> bool:
        e = self._entries.pop(request_id, None)
        if e is None:
            return False
        if e.suspended:
            self._free_held(e.vllm_id)
        else:
            self._by_external.pop(e.external_id, None)
            self.llm.abort_request([e.external_id])
        e.req.status, e.req.finish_reason = RequestStatus.FINISHED, FinishReason.ABORT
        log.debug("aborted %s", request_id)
        return True

    def has_unfinished(self) -> bool:
        return any(not e.suspended for e in self._entries.values()) or bool(self._shared.release)

    # ----- one step --------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        self._internals.swap_worker_connector(self._worker_connector)
        outs = self.llm.step()
        elapsed = time.perf_counter() - start
        self._steps.append((time.monotonic(), elapsed, self._shared.step_tokens))
        results = []
        for out in outs:
            e = self._by_external.get(out.request_id)
            if e is None:
                continue
            req = e.req
            for token in out.outputs[0].token_ids if out.outputs else ():
                req.append_token(int(token))
                if req.is_finished:
                    break
            if out.finished and not req.is_finished:       # vLLM ended it first (its own length limit)
                log.warning("vLLM finished %s before Tidal did (%s)", req.request_id, out.outputs[0].finish_reason)
                req.finish_reason, req.status = FinishReason.LENGTH, RequestStatus.FINISHED
                req.detok.flush()
            results.append(req.take_output())
            if req.is_finished:
                self._by_external.pop(e.external_id, None)
                self._entries.pop(req.request_id, None)
                if not out.finished:
                    self.llm.abort_request([e.external_id])     # a stop Tidal saw: EOS, stop token or string
        return results

    # ----- load ------------------------------------------------------------------------------------------------
    def load(self) -> LoadSnapshot:
        s, ix = self._sched, self._internals
        free_in_vllm = ix.num_free_blocks(s)
        reserved = min(self._reserved(), free_in_vllm)
        mine = {e.vllm_id: e for e in self._entries.values() if not e.suspended}
        running = [r for r in ix.running(s) if r.request_id in mine]
        waiting = [r for r in ix.waiting(s) if r.request_id in mine]
        head = waiting[0] if waiting else None
        now = time.monotonic()
        recent = [st for st in self._steps if now - st[0] < 5.0]
        busy = sum(st[1] for st in recent)
        computed = sum(st[2] for st in recent)
        active = list(mine.values())
        self._count_preemptions(running + waiting, mine)
        return LoadSnapshot(
            total_blocks=self.num_blocks, free_blocks=free_in_vllm - reserved,
            used_blocks=self.num_blocks - free_in_vllm, reserved_blocks=reserved, block_size=self.block_size,
            num_running=len(running), num_waiting=len(waiting),
            num_preempted=sum(1 for r in waiting if r.num_preemptions > 0),
            num_suspended=sum(1 for e in self._entries.values() if e.suspended),
            head_demand_blocks=blocks_for(head.num_tokens + 1, self.block_size) if head else 0,
            waiting_demand_blocks=sum(blocks_for(r.num_tokens + 1, self.block_size) for r in waiting),
            running_tokens=sum(r.num_tokens for r in running),
            step_time_ms=1000.0 * busy / len(recent) if recent else 0.0,
            tokens_per_s=computed / busy if busy > 0 else 0.0,
            num_preemptions_total=self._preemptions_total,
            num_high_priority=sum(1 for e in active if e.req.priority > 0),
            head_wait_s=max(0.0, time.time() - mine[head.request_id].req.arrival_time) if head else 0.0,
            remaining_output_tokens=sum(max(0, e.req.params.max_tokens - e.req.num_output_tokens) for e in active),
        )

    def _count_preemptions(self, vllm_requests, mine: dict[str, _Entry]) -> None:
        for r in vllm_requests:
            e = mine[r.request_id]
            if r.num_preemptions > e.preemptions_counted:
                self._preemptions_total += r.num_preemptions - e.preemptions_counted
                e.preemptions_counted = r.num_preemptions

    def check_integrity(self) -> None:
        s, ix = self._sched, self._internals
        free_in_vllm = ix.num_free_blocks(s)
        if self._reserved() > free_in_vllm:
            raise AssertionError(f"imports reserve {self._reserved()} blocks but vLLM has {free_in_vllm} free")
        held = []
        for e in self._entries.values():
            if e.suspended:
                if e.vllm_id not in self._shared.held:
                    raise AssertionError(f"suspended {e.req.request_id} holds no blocks in vLLM")
                held += self._shared.held[e.vllm_id]
                continue
            r = ix.vllm_request(s, e.vllm_id)
            if r is None:
                raise AssertionError(f"request {e.req.request_id} is not in vLLM's scheduler")
            if r.num_tokens != e.req.num_tokens:
                raise AssertionError(f"request {e.req.request_id}: vLLM has {r.num_tokens} tokens, Tidal "
                                     f"{e.req.num_tokens}")
            held += ix.block_ids(s, e.vllm_id)
        held += [b for rid, ids in self._shared.held.items() if rid in self._shared.release for b in ids]
        if len(held) != len(set(held)):
            raise AssertionError("two requests hold the same vLLM block")
        used = self.num_blocks - free_in_vllm
        if len(held) != used:
            raise AssertionError(f"requests hold {len(held)} blocks but vLLM counts {used} used")

    def request_info(self, request_id: str) -> RequestInfo | None:
        e = self._entries.get(request_id)
        if e is None:
            return None
        req = e.req
        if e.suspended:
            status, computed, preemptions = "suspended", e.computed_at_suspend, e.preemptions_before
        else:
            r = self._internals.vllm_request(self._sched, e.vllm_id)
            running = r is not None and r.status.name == "RUNNING"
            status = "running" if running else "waiting"
            computed = r.num_computed_tokens if r is not None else 0
            preemptions = e.preemptions_before + (r.num_preemptions if r is not None else 0)
        return RequestInfo(request_id=request_id, status=status, num_tokens=req.num_tokens,
                           num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=req.num_output_tokens,
                           max_tokens=req.params.max_tokens, num_computed_tokens=computed, priority=req.priority,
                           num_preemptions=preemptions)

    def list_requests(self) -> list[RequestInfo]:
        return [self.request_info(rid) for rid in list(self._entries)]

    def tokens_computed(self, request_id: str) -> int:
        """How many tokens vLLM's scheduler has scheduled for the request's current vLLM request (its own
        SchedulerOutput.num_scheduled_tokens, summed), and how many the connector loaded instead: (computed,
        loaded). What the tests read to tell a moved request from a re-prefilled one."""
        e = self._get(request_id)
        return self._shared.scheduled_tokens.get(e.vllm_id, 0), self._shared.loaded_tokens.get(e.vllm_id, 0)

    # ----- migration: the source half ------------------------------------------------------------------------
    def export_blocks(self, request_id: str, start: int, end: int) -> torch.Tensor:
        e = self._get(request_id)
        ids = self._shared.held.get(e.vllm_id, []) if e.suspended else self._internals.block_ids(self._sched,
                                                                                                  e.vllm_id)
        ids = ids[start:end]
        if len(ids) != end - start:
            raise ValueError(f"request {request_id} holds {len(ids)} of blocks {start}..{end - 1}")
        return self._shared.read(ids)

    def suspend(self, request_id: str) -> RequestState:
        e = self._get(request_id)
        if not e.suspended:
            r = self._internals.vllm_request(self._sched, e.vllm_id)
            e.computed_at_suspend = r.num_computed_tokens if r is not None else 0
            e.preemptions_before += r.num_preemptions if r is not None else 0
            self._shared.hold.add(e.vllm_id)
            self.llm.abort_request([e.external_id])
            self._shared.hold.discard(e.vllm_id)
            if e.vllm_id not in self._shared.held:
                raise RuntimeError(f"vLLM did not hand request {request_id}'s blocks to the Tidal connector")
            self._by_external.pop(e.external_id, None)
            e.suspended = True
            e.req.status = RequestStatus.SUSPENDED
        return dataclasses.replace(e.req.to_state(), num_computed_tokens=e.computed_at_suspend,
                                   num_preemptions=e.preemptions_before)

    def resume(self, request_id: str) -> None:
        from instance.backends.vllm.connector import Staged

        e = self._get(request_id)
        if not e.suspended:
            return
        held = self._shared.held.get(e.vllm_id, [])
        key = None
        if e.computed_at_suspend > 0:
            key = f"resume:{e.vllm_id}"
            self._shared.staged[key] = Staged(e.computed_at_suspend, held_block_ids=held, held_vllm_id=e.vllm_id)
        else:
            self._free_held(e.vllm_id)
        e.suspended = False
        self._admit(e, key)

    def free_suspended(self, request_id: str) -> None:
        e = self._get(request_id)
        if not e.suspended:
            raise ValueError(f"request {request_id} is {e.req.status.value}, not suspended")
        self._free_held(e.vllm_id)
        del self._entries[request_id]

    # ----- migration: the destination half -------------------------------------------------------------------
    def reserve_import(self, import_id: str, num_blocks: int) -> int:
        free = self._internals.num_free_blocks(self._sched) - self._reserved()
        if num_blocks > free:
            raise OutOfBlocksError(f"cannot reserve {num_blocks} blocks: {max(0, free)} free")
        imp = self._imports.setdefault(import_id, _Import())
        first = imp.num_blocks
        imp.num_blocks += num_blocks
        return first

    def write_import(self, import_id: str, first: int, blocks: torch.Tensor) -> None:
        imp = self._imports.get(import_id)
        if imp is None:
            raise ValueError(f"import {import_id}: nothing reserved for it")
        n = blocks.shape[2]
        if first < 0 or first + n > imp.num_blocks:
            raise ValueError(f"import {import_id}: blocks {first}..{first + n - 1} were not reserved "
                             f"({imp.num_blocks} were)")
        imp.chunks[first] = blocks

    def commit_import(self, import_id: str, state: RequestState) -> None:
        from instance.backends.vllm.connector import Staged

        self._check_new_id(state.request_id)
        if state.sample_index != len(state.token_ids) - state.num_prompt_tokens:
            raise ValueError("request state: sample_index must equal the number of output tokens")
        imp = self._imports.get(import_id, _Import())
        need = blocks_for(state.num_computed_tokens, self.block_size)
        blocks = self._assemble(import_id, imp, need)
        self._imports.pop(import_id, None)      # reserved beyond `need` (growth room): simply not used
        p = state.params
        detok = Detokenizer(self.tokenizer.token_bytes, p.stop, state.text, state.text_emitted, state.pending_bytes)
        req = self._request(state.request_id, list(state.token_ids), state.num_prompt_tokens, p, state.seed,
                            state.priority, state.arrival_time, detok)
        key = None
        if need:
            key = f"import:{import_id}"
            self._shared.staged[key] = Staged(state.num_computed_tokens, blocks=blocks)
        self._admit(_Entry(req, preemptions_before=state.num_preemptions), key)

    def cancel_import(self, import_id: str) -> None:
        self._imports.pop(import_id, None)

    def _assemble(self, import_id: str, imp: _Import, need: int) -> torch.Tensor | None:
        """The import's first `need` blocks as one tensor; ValueError if some were never written."""
        if need == 0:
            return None
        parts, at = [], 0
        for first in sorted(imp.chunks):
            chunk = imp.chunks[first]
            if first > at:
                break
            if first + chunk.shape[2] > at:
                parts.append(chunk[:, :, at - first:])
                at = first + chunk.shape[2]
        if at < need:
            raise ValueError(f"import {import_id}: {need} blocks needed for the request's computed tokens, "
                             f"{at} were written")
        return torch.cat(parts, dim=2)[:, :, :need] if len(parts) > 1 else parts[0][:, :, :need]

    # ----- helpers -------------------------------------------------------------------------------------------
    def _free_held(self, vllm_id: str) -> None:
        """The blocks vLLM keeps for a suspended request go back now (between two steps)."""
        self._shared.held.pop(vllm_id, None)
        self._shared.release.discard(vllm_id)
        self._internals.free_held_blocks(self._sched, vllm_id)

    def _reserved(self) -> int:
        return sum(i.num_blocks for i in self._imports.values())

    def _get(self, request_id: str) -> _Entry:
        try:
            return self._entries[request_id]
        except KeyError:
            raise UnknownRequestError(request_id) from None

    def _check_new_id(self, request_id: str) -> None:
        if not request_id:
            raise InvalidRequestError("request_id", "must be a non-empty string")
        if request_id in self._entries:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use on this engine")

    def _request(self, request_id: str, token_ids: list[int], num_prompt: int, params: SamplingParams, seed: int,
                 priority: int, arrival_time: float, detok: Detokenizer | None = None) -> Request:
        return Request(request_id=request_id, token_ids=token_ids, num_prompt_tokens=num_prompt, params=params,
                       seed=seed, priority=priority, arrival_time=arrival_time,
                       detok=detok or Detokenizer(self.tokenizer.token_bytes, params.stop),
                       eos_token_ids=frozenset(self.tokenizer.eos_token_ids), max_model_len=self.max_model_len)

    def _admit(self, e: _Entry, load_key: str | None = None) -> None:
        """Hand the request to vLLM: its whole token list as prompt, the rest of its budget as max_tokens;
        `load_key` names KV staged for the connector to load instead of computing it."""
        from vllm import SamplingParams as VllmParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        from instance.backends.vllm.connector import LOAD_KEY
        from instance.backends.vllm.sampler import EXTRA_ARG, sample_args

        req, p = e.req, e.req.params
        extra: dict = {}
        if not p.greedy:
            extra[EXTRA_ARG] = sample_args(p, req.seed, req.num_output_tokens)
        if load_key is not None:
            extra["kv_transfer_params"] = {LOAD_KEY: load_key}
        budget = min(p.max_tokens - req.num_output_tokens, self.max_model_len - req.num_tokens)
        params = VllmParams(max_tokens=budget, temperature=0.0, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA, extra_args=extra or None)
        e.preemptions_counted = 0
        e.external_id = f"{req.request_id}@{e.admissions}"
        e.admissions += 1
        e.vllm_id = self.llm.add_request(e.external_id, TokensPrompt(prompt_token_ids=list(req.token_ids)), params,
                                         arrival_time=req.arrival_time, priority=-req.priority)
        req.status = RequestStatus.WAITING
        self._entries[req.request_id] = e
        self._by_external[e.external_id] = e


def _read_json(path) -> dict:
    import json

    return json.loads(path.read_text())
