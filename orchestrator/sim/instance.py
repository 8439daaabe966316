"""One simulated instance: the real batch scheduler and block pool, a modelled clock instead of a model.

`SimInstance` owns an `instance.scheduler.Scheduler` over an `instance.kv_cache.BlockPool` and real `Request`
objects, so it admits, chunks prefills and preempts exactly as an `Engine` does; only `execute` is replaced:
a step lasts what the cost model says, and every request that reaches its last token gets token 0 (EOS is
ignored, so a request produces exactly its `max_tokens`). `load()` and `list_requests()` report what
`Engine.load()` and `Engine.list_requests()` report (tests/unit/test_sim.py compares them on the same
requests); the timing fields of the load are left at 0, no policy reads them.
"""

from __future__ import annotations

from instance.backend import LoadSnapshot, RequestInfo
from instance.kv_cache import BlockPool
from instance.request import Detokenizer, Request, RequestStatus
from instance.sampling import SamplingParams
from instance.scheduler import Scheduler, SchedulerOutput, blocks_for, load_snapshot
from orchestrator.sim.cost_model import StepCostModel


def _no_bytes(token_id: int) -> bytes:
    return b""


def make_request(request_id: str, prompt_tokens: int, output_tokens: int, priority: int, arrival_s: float,
                 max_model_len: int) -> Request:
    params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    return Request(request_id=request_id, token_ids=[0] * prompt_tokens, num_prompt_tokens=prompt_tokens,
                   params=params, seed=0, priority=priority, arrival_time=arrival_s,
                   detok=Detokenizer(_no_bytes, ()), eos_token_ids=frozenset(), max_model_len=max_model_len)


class SimInstance:
    def __init__(self, instance_id: str, num_blocks: int, block_size: int, max_num_batched_tokens: int,
                 max_num_seqs: int, cost: StepCostModel):
        self.instance_id = instance_id
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.scheduler = Scheduler(self.pool, block_size, max_num_batched_tokens, max_num_seqs)
        self.cost = cost
        self.requests: dict[str, Request] = {}
        self.step: SchedulerOutput | None = None      # the step in flight
        self.busy_s = 0.0

    # ----- requests --------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def has_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting)

    # ----- one step: decide now, apply when the modelled time has passed -----------------------------------
    def start_step(self) -> float | None:
        """Schedule a step; return how long it takes, or None if there is nothing to run."""
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return None
        self.step = sched
        seconds = self.cost.seconds(sched.chunks)
        self.busy_s += seconds
        return seconds

    def finish_step(self) -> list[Request]:
        """Apply the step in flight; return the requests that got a token (finished ones are gone)."""
        sched, self.step = self.step, None
        sampled = []
        for chunk in sched.chunks:
            req = chunk.request
            req.num_computed_tokens += chunk.num_tokens
            if req.num_computed_tokens == req.num_tokens:
                req.append_token(0)
                req.new_token_ids.clear()
                sampled.append(req)
        for req in sampled:
            if req.is_finished:
                self.scheduler.remove(req)
                self.scheduler.free_blocks(req)
                del self.requests[req.request_id]
        return sampled

    # ----- migration hooks (what the engine's are, minus tensors) ------------------------------------------
    def suspend(self, req: Request) -> None:
        self.scheduler.remove(req)
        req.status = RequestStatus.SUSPENDED

    def resume(self, req: Request) -> None:
        if req.num_computed_tokens > 0:
            self.scheduler.add_running(req)
        else:
            self.scheduler.add(req)

    def free_suspended(self, req: Request) -> None:
        self.scheduler.free_blocks(req)
        del self.requests[req.request_id]

    def admit_migrated(self, req: Request, block_ids: list[int]) -> None:
        self.pool.commit_reserved(block_ids)
        req.block_ids = list(block_ids)
        self.requests[req.request_id] = req
        self.resume(req)

    # ----- what the control plane sees -------------------------------------------------------------------
    def load(self) -> LoadSnapshot:
        return load_snapshot(self.scheduler, self.pool, self.requests.values(), self.block_size)

    def list_requests(self) -> list[RequestInfo]:
        return [RequestInfo(request_id=r.request_id, status=r.status.value, num_tokens=r.num_tokens,
                            num_prompt_tokens=r.num_prompt_tokens, num_output_tokens=r.num_output_tokens,
                            max_tokens=r.params.max_tokens, num_computed_tokens=r.num_computed_tokens,
                            priority=r.priority, num_preemptions=r.num_preemptions)
                for r in self.requests.values()]

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        held = [b for r in self.requests.values() for b in r.block_ids]
        if len(held) != len(set(held)) or len(held) != self.pool.num_used:
            raise AssertionError(f"{self.instance_id}: requests hold {len(held)} blocks, pool counts "
                                 f"{self.pool.num_used} used")
        for r in self.requests.values():
            if len(r.block_ids) < blocks_for(r.num_computed_tokens, self.block_size):
                raise AssertionError(f"{self.instance_id}: {r.request_id} has fewer blocks than its KV needs")
