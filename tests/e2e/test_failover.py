"""Instances and frontends die under load; streams go on (or end with a clear status) and nothing leaks."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from tests.e2e.helpers import (TINY, deployment, request,
                               tokens_of)
from tidal.v1 import generation_pb2

N_TOKENS = 600
EXACT = {"deterministic": True}     # resumed by re-prefill, a stream continues with exactly its fault-free tokens


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**TINY, deterministic=True)


def cases(n: int) -> list[dict]:
    """Half greedy, half seeded sampling: both must come out exactly as without faults."""
    out = []
    for i in range(n):
        c = dict(prompt=f"failover request {i}", max_tokens=N_TOKENS, ignore_eos=True, request_id=f"fo-{i}")
        if i % 2:
            c.update(temperature=0.8, top_p=0.95, seed=100 + i)
        out.append(c)
    return out


def expected_tokens(reference: Engine, case: dict) -> list[int]:
    params = SamplingParams(max_tokens=case["max_tokens"], temperature=case.get("temperature", 0.0),
                            top_p=case.get("top_p", 1.0), seed=case.get("seed"), ignore_eos=True)
    return reference.generate([case["prompt"]], params)[0].new_token_ids


def views(c):
    return {v.instance_id: v for v in c.deployment.scheduler.list_instances().result()}


def wait_state(c, iid: str, state: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while views(c)[iid].state != state:
        assert time.monotonic() < deadline, f"{iid} never became {state}"
        time.sleep(0.05)


def run_with_kill(c, reference, kill) -> None:
    """10 concurrent streams; `kill()` once they are all under way; all must finish with fault-free tokens."""
    todo = cases(10)
    started = {}

    def consume(case):
        chunks = []
        for chunk in c.gen.Generate(request(**case), timeout=120):
            chunks.append(chunk)
            if len(chunks) == 5:
                started[case["request_id"]] = True
        return chunks

    with ThreadPoolExecutor(len(todo)) as pool:
        futures = [pool.submit(consume, case) for case in todo]
        deadline = time.monotonic() + 60
        while len(started) < len(todo):
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.01)
        kill()
        results = [f.result() for f in futures]
    for case, chunks in zip(todo, results):
        assert [ch.seq for ch in chunks] == list(range(len(chunks))), case["request_id"]
        assert tokens_of(chunks) == expected_tokens(reference, case), case["request_id"]   # bit-exact engines
        assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert {ch.instance_id for chunks in results for ch in chunks} >= {"instance-0", "instance-1"}


def test_instance_failures_resume_every_stream_identically(ray_local, reference):
    with deployment("e2e-fo", engine=EXACT, restart_dead_instances=True, rebalance=dict(auto=False)) as c:
        # 1. ray.kill of an instance actor
        run_with_kill(c, reference, views(c)["instance-0"].client.kill)
        wait_state(c, "instance-0", "serving")            # --restart-dead-instances brought it back
        c.wait_all_blocks_free()

        # 2. SIGKILL of an instance's worker process
        pid = views(c)["instance-1"].info.pid
        run_with_kill(c, reference, lambda: os.kill(pid, signal.SIGKILL))
        wait_state(c, "instance-1", "serving")
        c.wait_all_blocks_free()


def test_with_no_instance_left_streams_end_unavailable_after_their_partial_tokens(ray_local):
    with deployment("e2e-fo-none", engine=EXACT, rebalance=dict(auto=False)) as c:
        stream = c.gen.Generate(request(prompt="doomed", max_tokens=N_TOKENS, ignore_eos=True), timeout=60)
        got = [next(stream) for _ in range(3)]
        for v in views(c).values():
            v.client.kill()
        with pytest.raises(grpc.RpcError) as err:
            for chunk in stream:
                got.append(chunk)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no instance" in err.value.details() or "retry budget" in err.value.details()
        assert [ch.seq for ch in got] == list(range(len(got)))


def test_a_dead_frontends_requests_are_aborted_and_their_blocks_freed(ray_local):
    with deployment("e2e-fo-fe", engine=EXACT, rebalance=dict(auto=False)) as c:
        streams = [c.gen.Generate(request(prompt=f"orphan {i}", max_tokens=1000, ignore_eos=True), timeout=60)
                   for i in range(4)]
        for s in streams:
            next(s)
        instances = [v.client for v in views(c).values()]
        c.deployment.frontend.kill()
        c.deployment.frontend = None                      # it is gone; teardown must not wait for it
        deadline = time.monotonic() + 15
        while True:
            statuses = [a.get_status().result() for a in instances]
            if all(s.num_requests == 0 and s.load.free_blocks == s.load.total_blocks for s in statuses):
                break
            assert time.monotonic() < deadline, f"requests of the dead frontend still held: {statuses}"
            time.sleep(0.1)
        for s in streams:
            s.cancel()
