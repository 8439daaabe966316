"""The frontend's own handling of faults, in-process over fake instance clients: an instance seen dead is fenced
at once (no second request goes to it) and its streams fail over; a failover that cannot find an instance ends
within its bound; a stream that makes no progress ends within the idle bound. (tests/e2e covers kills of real
instances.)"""

import asyncio
import time

import grpc
import pytest

import orchestrator.frontend as frontend_module
from instance.backend import LoadSnapshot, RequestInfo
from instance.config import EngineConfig
from instance.messages import InstanceInfo, InstanceStatus, TokenChunk
from orchestrator.fleet import DEAD, SERVING, InstanceView
from orchestrator.frontend import Frontend, RpcError
from rpc import ActorDead
from tests.e2e.helpers import request


class FakeInstance:
    """An instance client: `dead` ones answer ActorDead; live ones stream `tokens` tokens to the frontend."""

    def __init__(self, instance_id: str, frontend: Frontend, dead: bool = False, tokens: int = 3,
                 silent: bool = False):
        self.instance_id, self.fe, self.dead, self.tokens, self.silent = instance_id, frontend, dead, tokens, silent
        self.actor = object()
        self.calls: list[tuple[str, str]] = []           # (method, request id)

    async def _serve(self, method, rid, next_seq):
        self.calls.append((method, rid))
        if self.dead:
            raise ActorDead(self.instance_id, method, "ActorDiedError")
        if not self.silent:
            asyncio.get_running_loop().call_soon(asyncio.ensure_future, self._stream(rid, next_seq))
        return 0

    async def _stream(self, rid, seq):
        for i in range(self.tokens):
            last = i == self.tokens - 1
            await self.fe.push_chunks([TokenChunk(rid, seq + i, (7,), "x", self.instance_id,
                                                  "length" if last else None)])

    async def add_request(self, rid, ids, params, priority, sink):
        return await self._serve("add_request", rid, 0)

    async def recover_request(self, rid, prompt, output, params, seed, priority, text_emitted, sink, next_seq):
        return await self._serve("recover_request", rid, next_seq)

    async def abort_request(self, rid):
        self.calls.append(("abort_request", rid))
        if self.dead:
            raise ActorDead(self.instance_id, "abort_request", "ActorDiedError")
        return True


def status(instance_id: str, requests=()) -> InstanceStatus:
    load = LoadSnapshot(total_blocks=100, free_blocks=100, used_blocks=0, reserved_blocks=0, block_size=16,
                        num_running=len(requests), num_waiting=0, num_preempted=0, num_suspended=0,
                        head_demand_blocks=0, waiting_demand_blocks=0, running_tokens=0, step_time_ms=1.0,
                        tokens_per_s=1000.0, num_preemptions_total=0)
    return InstanceStatus(instance_id, load, 1, len(requests), tuple(requests))


def view(inst: FakeInstance, state: str = SERVING, requests=()) -> InstanceView:
    info = InstanceInfo(inst.instance_id, "node", "10.0.0.1", "tiny-llama", 1024, 260)
    return InstanceView(inst.instance_id, inst, state, info, status(inst.instance_id, requests), time.time())


def listed(rid: str) -> RequestInfo:
    return RequestInfo(rid, "waiting", 5, 5, 0, 8, 0, 0, 0)


def make_frontend(**config) -> Frontend:
    fe = Frontend({"engine": EngineConfig(model="tiny-llama").model_dump(), "dispatch_policy": "round-robin",
                   **config}, "fe")
    fe.me = object()              # the sink instances push to: the fakes call push_chunks directly
    fe.accepting = True
    return fe


async def collect(fe: Frontend, **fields) -> list[TokenChunk]:
    return [c async for c in fe.generate(request(prompt="hello", max_tokens=3, **fields), None)]


def test_an_instance_seen_dead_gets_no_second_request_and_its_stream_fails_over():
    async def scenario():
        fe = make_frontend()
        dead, alive = FakeInstance("instance-0", fe, dead=True), FakeInstance("instance-1", fe)
        await fe.update_instances([view(dead), view(alive)])      # the scheduler has not noticed: both serve
        streams = [await collect(fe, request_id=f"r{i}") for i in range(5)]
        assert all([c.seq for c in s] == [0, 1, 2] and s[-1].finish_reason for s in streams)
        assert [m for m, _ in dead.calls] == ["add_request"]      # one attempt, then fenced
        assert ("recover_request", dead.calls[0][1]) in alive.calls
        await fe.update_instances([view(dead), view(alive)])      # the same dead actor: still fenced
        await collect(fe, request_id="r5")
        assert len(dead.calls) == 1
        replaced = FakeInstance("instance-0", fe)                 # the scheduler replaced it
        await fe.update_instances([view(replaced), view(alive)])
        await collect(fe, request_id="r6")
        await collect(fe, request_id="r7")
        assert replaced.calls and "instance-0" not in fe.fenced

    asyncio.run(scenario())


def test_a_failover_with_no_instance_coming_back_ends_at_once_and_one_waiting_ends_within_its_bound(monkeypatch):
    monkeypatch.setattr(frontend_module, "FAILOVER_BOUND_S", 0.5)

    async def scenario():
        for restart, bound in ((False, 0.3), (True, 1.5)):
            fe = make_frontend(restart_dead_instances=restart)
            dead = FakeInstance("instance-0", fe, dead=True)
            await fe.update_instances([view(dead)])
            started = time.monotonic()
            with pytest.raises(RpcError) as err:
                await collect(fe)
            took = time.monotonic() - started
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "no instance could take over" in str(err.value)
            assert took < bound, (restart, took)
            if restart:                                   # it waited for a replacement before giving up
                assert took >= 0.4

    asyncio.run(scenario())


def test_a_request_waits_for_an_instance_that_is_coming_back(monkeypatch):
    async def scenario():
        fe = make_frontend(restart_dead_instances=True)
        gone = FakeInstance("instance-0", fe, dead=True)
        await fe.update_instances([view(gone, state=DEAD)])

        async def replace_soon():
            await asyncio.sleep(0.3)
            await fe.update_instances([view(FakeInstance("instance-0", fe))])

        asyncio.ensure_future(replace_soon())
        chunks = await collect(fe)
        assert [c.seq for c in chunks] == [0, 1, 2] and not gone.calls

    asyncio.run(scenario())


def test_a_stream_ends_unavailable_once_it_makes_no_progress_for_the_idle_bound(monkeypatch):
    monkeypatch.setattr(frontend_module, "PROGRESS_CHECK_S", 0.05)

    async def scenario():
        fe = make_frontend(stream_idle_timeout_s=0.6)
        quiet = FakeInstance("instance-0", fe, silent=True)       # accepts, then never sends a token
        await fe.update_instances([view(quiet)])
        started = time.monotonic()
        task = asyncio.ensure_future(collect(fe, request_id="q"))
        for _ in range(10):                                       # 1 s during which it still lists the request
            await asyncio.sleep(0.1)
            await fe.update_instances([view(quiet, requests=[listed("q")])])
        assert not task.done()
        with pytest.raises(RpcError) as err:
            await task
        took = time.monotonic() - started
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "no progress" in str(err.value)
        assert 1.5 <= took < 2.5

    asyncio.run(scenario())


def test_the_idle_bound_is_sized_from_the_deployment():
    async def scenario():
        fe = make_frontend()
        inst = FakeInstance("instance-0", fe)
        await fe.update_instances([view(inst)])                  # max_model_len 1024, 1000 tokens/s observed
        assert fe.idle_bound_s() == pytest.approx(30.0 + 1024 / 1000.0)

    asyncio.run(scenario())
