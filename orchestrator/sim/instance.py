"""One simulated instance: the engine's own `EngineCore` (requests, batch scheduler, block pool, migration
hooks), with a modelled clock instead of a model.

It admits, chunks prefills, preempts, reports load and moves requests exactly as an `Engine` does, because it
runs the same code; only execution is replaced: a step lasts what the cost model says, and every request that
reaches its last token gets token 0 (EOS is ignored, so a request produces exactly its `max_tokens`).
tests/unit/test_sim.py checks the loads against an engine's step by step. The timing fields of the load are
left at 0; no policy reads them.

Prefix caching (`prefix_caching`): the same pool and admission as the engine's; requests then carry their
token ids (the trace's block structure, `orchestrator.bench.replay.prompt_from_hash_ids`) so that equal
prefixes hash equal, and a cached prefix shortens the prefill the cost model charges. Without token ids a
request's prompt is placeholders that share nothing.
"""

from __future__ import annotations

import zlib
from typing import Callable

from instance.backend import LoadSnapshot, RequestInfo
from instance.core import EngineCore
from instance.request import Request
from instance.sampling import SamplingParams
from instance.scheduler import SchedulerOutput
from orchestrator.sim.cost_model import StepCostModel


SIM_VOCAB = 1 << 30          # token ids the simulated model takes (prompts built from trace hash ids)
SIM_HASH_SEED = "simulated-model"


def _no_bytes(token_id: int) -> bytes:
    return b""


class SimInstance:
    def __init__(self, instance_id: str, num_blocks: int, block_size: int, max_num_batched_tokens: int,
                 max_num_seqs: int, max_model_len: int, cost: StepCostModel, clock: Callable[[], float],
                 prefix_caching: bool = False, digest_limit: int = 4096):
        self.instance_id = instance_id
        self.core = EngineCore(num_blocks, block_size, max_num_batched_tokens, max_num_seqs, max_model_len,
                               vocab_size=SIM_VOCAB, token_bytes=_no_bytes, clock=clock,
                               prefix_cache_seed=SIM_HASH_SEED if prefix_caching else None,
                               digest_limit=digest_limit if prefix_caching else 0)
        self.cost = cost
        self.step: SchedulerOutput | None = None      # the step in flight
        self.busy_s = 0.0

    # ----- requests --------------------------------------------------------------------------------------
    def add(self, request_id: str, prompt_tokens: int, output_tokens: int, priority: int, arrival_s: float,
            token_ids: tuple[int, ...] | None = None) -> None:
        params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
        ids = list(token_ids) if token_ids is not None else self._placeholders(request_id, prompt_tokens)
        self.core.add_request(request_id, ids, params, priority, arrival_s)

    def _placeholders(self, request_id: str, n: int) -> list[int]:
        """Token 0, or with prefix caching on a first token of the request's own so that nothing is shared."""
        if self.core.scheduler.hash_seed is None:
            return [0] * n
        return [zlib.crc32(request_id.encode()) % SIM_VOCAB] + [0] * (n - 1)

    def has_work(self) -> bool:
        return self.core.has_unfinished()

    # ----- one step: decide now, apply when the modelled time has passed -----------------------------------
    def start_step(self) -> float | None:
        """Schedule a step; return how long it takes, or None if there is nothing to run."""
        sched = self.core.schedule()
        if not sched.chunks:
            return None
        self.step = sched
        seconds = self.cost.seconds(sched.chunks)
        self.busy_s += seconds
        return seconds

    def finish_step(self) -> list[Request]:
        """Apply the step in flight; return the requests that got a token (finished ones are gone)."""
        sched, self.step = self.step, None
        sampling = [c.request for c in sched.chunks if c.samples]
        self.core.update(sched, [0] * len(sampling))
        return sampling

    # ----- what the control plane sees -------------------------------------------------------------------
    def load(self) -> LoadSnapshot:
        return self.core.load()

    def list_requests(self) -> list[RequestInfo]:
        return self.core.list_requests()

    def check_integrity(self) -> None:
        self.core.check_integrity()
