"""The interface the instance layer uses to talk to an engine, and the load snapshot every engine reports.

`InstanceActor`, the migration ports and the frontend see only `EngineBackend`, so another engine (vLLM on GPU
fleets) can plug in here without touching the orchestrator. The engines themselves live in `instance/backends/`
(`native`, `vllm`); `instance.backends.create_backend` builds the one an `EngineConfig` names.
"""

from __future__ import annotations

import abc
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from instance.request import RequestOutput, RequestState
    from instance.sampling import SamplingParams
    from instance.tokenizer import Tokenizer


class UnknownRequestError(KeyError):
    """No request with this id is on this engine."""


@dataclass(frozen=True)
class LoadSnapshot:
    """An engine's load after a step. Plain values only: cheap to build every step and to send anywhere."""

    total_blocks: int
    free_blocks: int
    used_blocks: int
    reserved_blocks: int
    block_size: int
    num_running: int
    num_waiting: int
    num_preempted: int            # waiting requests that were preempted and wait to be recomputed
    num_suspended: int            # taken out of the batch for a migration
    head_demand_blocks: int       # blocks the head of the waiting queue needs to be admitted
    waiting_demand_blocks: int    # blocks all waiting requests need
    running_tokens: int           # tokens (prompt + output) of the running batch
    step_time_ms: float           # mean step time over the last few seconds
    tokens_per_s: float           # tokens computed per second of step time over the last few seconds
    num_preemptions_total: int
    num_high_priority: int = 0    # running or waiting requests with priority > 0 (policies give them headroom)
    head_wait_s: float = 0.0      # how long the head of the waiting queue has waited since it arrived
    remaining_output_tokens: int = 0  # tokens the running and waiting requests may still generate (max_tokens)
    cached_blocks: int = 0        # free blocks that still hold a cached prefix (counted in free_blocks: evictable)
    prefix_hit_tokens: int = 0    # tokens admissions found in the prefix cache, since the start
    prefix_query_tokens: int = 0  # tokens of all admissions (with caching on), since the start
    prefill_backlog_tokens: int = 0  # prompt tokens the running and waiting requests have still to prefill
    cached_prefixes: tuple[int, ...] = ()  # a bounded digest: hashes of cached blocks, most recently used first

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def to_dict(self) -> dict:
        """Every counter (what `tidal status` shows); the digest is for dispatch only and stays out."""
        d = asdict(self)
        del d["cached_prefixes"]
        return d


@dataclass(frozen=True)
class RequestInfo:
    """One request as the control plane sees it (migration, policies, status)."""

    request_id: str
    status: str                   # waiting | running | suspended
    num_tokens: int               # prompt + output so far
    num_prompt_tokens: int
    num_output_tokens: int
    max_tokens: int
    num_computed_tokens: int
    priority: int
    num_preemptions: int


class EngineBackend(abc.ABC):
    """Everything an instance needs from an engine, and nothing more: `InstanceActor`, the migration ports
    (`instance/migration_ports.py`) and the frontend use only what is declared here, so another engine plugs in
    by implementing it and passing the conformance suite (`tests/unit/test_backend_conformance.py`).

    Every method is called from one thread, between two steps, except those marked *beside a step*: they may
    run in another thread while `step()` runs, and touch only blocks no running request can change.

    KV blocks travel as one tensor per call, [layers, 2, n, block_size, kv_heads, head_dim] (n blocks, in the
    request's token order). A migration is request-centred on both sides: the source exports a request's
    blocks by their index within the request, the destination collects them in an *import* keyed by the
    migration, and never sees the other engine's block ids.
    """

    # ----- what it serves (fixed for its lifetime) -----------------------------------------------------------
    kind: str                     # which backend: "native" or "vllm" (blocks move only between engines of one kind)
    model_name: str
    max_model_len: int
    block_size: int               # tokens per KV block
    vocab_size: int
    tokenizer: "Tokenizer"

    # ----- serving -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def validate(self, prompt_token_ids: list[int], params: "SamplingParams", priority: int = 0) -> list[int]:
        """Check a request's inputs without adding it; raise InvalidRequestError naming the field and the limit."""

    @abc.abstractmethod
    def add_request(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                    params: "SamplingParams | None" = None, priority: int = 0,
                    arrival_time: float | None = None) -> None:
        """Queue a request (token ids, or a prompt this engine's tokenizer encodes); InvalidRequestError for bad
        input or an id already in use."""

    @abc.abstractmethod
    def resume_from_tokens(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                           params: "SamplingParams", seed: int, priority: int, text_emitted: int) -> None:
        """Take over a request whose instance died: recompute prompt + the output its client already has, then
        go on with output token len(output_token_ids), drawing as the lost instance would have; its stream
        text goes on after the first `text_emitted` characters. InvalidRequestError(field request_id) if the
        request is already here."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if it is not here."""

    @abc.abstractmethod
    def step(self) -> list["RequestOutput"]:
        """Run one step; an output for every request that got a token (finished ones are gone after)."""

    @abc.abstractmethod
    def has_unfinished(self) -> bool:
        """Whether a step has anything to do (suspended requests do not count)."""

    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None,
                 max_steps: int = 100_000) -> list[RequestOutput]:
        """Run prompts to completion (for tests and benchmarks): one summary output per prompt, in order."""
        from instance.request import RequestOutput

        ids = [f"gen-{i}-{uuid.uuid4().hex[:8]}" for i in range(len(prompts))]
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

    @abc.abstractmethod
    def load(self) -> LoadSnapshot: ...

    @abc.abstractmethod
    def request_info(self, request_id: str) -> RequestInfo | None: ...

    @abc.abstractmethod
    def list_requests(self) -> list[RequestInfo]:
        """Every request held (running, waiting, suspended), in arrival order."""

    @abc.abstractmethod
    def check_integrity(self) -> None:
        """AssertionError unless free + used + reserved == total blocks and every block has one holder."""

    # ----- migration: the source half ------------------------------------------------------------------------
    @abc.abstractmethod
    def export_blocks(self, request_id: str, start: int, end: int) -> "torch.Tensor":
        """A copy of the request's blocks start..end-1; *beside a step* for full blocks (they no longer change).
        UnknownRequestError if the request is not here."""

    def prefix_hashes(self, request_id: str, num_blocks: int) -> list[int]:
        """Prefix-cache hashes of the request's first `num_blocks` computed full blocks (a migration offers them
        to its destination); [] for an engine without a prefix cache (then every block is copied)."""
        return []

    @abc.abstractmethod
    def suspend(self, request_id: str) -> "RequestState":
        """Take the request out of the batch; it keeps its blocks until `free_suspended` or `resume`."""

    @abc.abstractmethod
    def resume(self, request_id: str) -> None:
        """Put a suspended request back into the batch (its migration failed)."""

    @abc.abstractmethod
    def free_suspended(self, request_id: str) -> None:
        """The suspended request lives elsewhere now: forget it and free its blocks."""

    # ----- migration: the destination half -------------------------------------------------------------------
    def attach_import_prefix(self, import_id: str, block_hashes: list[int]) -> int:
        """Begin an import with the leading blocks of `block_hashes` this engine has cached, so they are not
        copied; returns how many (blocks 0..n-1 of the request). 0 for an engine without a prefix cache."""
        return 0

    @abc.abstractmethod
    def reserve_import(self, import_id: str, num_blocks: int) -> int:
        """Set `num_blocks` more blocks aside for the request an import brings (the first call begins it);
        returns the index within the request of the first of them. OutOfBlocksError if they are not free."""

    @abc.abstractmethod
    def write_import(self, import_id: str, first: int, blocks: "torch.Tensor") -> None:
        """Write blocks first..first+n-1 of an import; *beside a step*. ValueError for blocks not reserved."""

    @abc.abstractmethod
    def commit_import(self, import_id: str, state: "RequestState") -> None:
        """Adopt the request with the import's blocks, holding the KV of its `num_computed_tokens` tokens."""

    @abc.abstractmethod
    def cancel_import(self, import_id: str) -> None:
        """Give an import's blocks back; no error if there is no such import."""
