"""Chaos: 200 requests on 3 instances while instances and the scheduler are killed at random."""

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from instance.engine import Engine
from instance.sampling import SamplingParams
from rpc import RemoteError
from tests.e2e.helpers import TINY, deployment, request, tokens_of
from tidal.v1 import generation_pb2

N_REQUESTS = 200
KILL_EVERY = 20   # finished requests between two kills
MIN_KILLS = 3     # the last HELD_BACK requests are sent only after this many kills (or 240 s)
HELD_BACK = 40


def make_cases(rng: random.Random) -> list[dict]:
    cases = []
    for i in range(N_REQUESTS):
        c = dict(prompt=f"chaos {i} " + "x" * rng.randint(0, 60), max_tokens=rng.randint(20, 120),
                 ignore_eos=True, request_id=f"chaos-{i}")
        if rng.random() < 0.5:
            c.update(temperature=0.7, top_k=50, seed=rng.randrange(1 << 30))
        cases.append(c)
    return cases


def test_random_kills_of_instances_and_the_scheduler_lose_no_request(ray_local):
    rng = random.Random(1234)
    cases = make_cases(rng)
    reference = Engine(**TINY)
    expected = {c["request_id"]: reference.generate(
        [c["prompt"]], SamplingParams(max_tokens=c["max_tokens"], temperature=c.get("temperature", 0.0),
                                      top_k=c.get("top_k", 0), seed=c.get("seed"), ignore_eos=True))[0].new_token_ids
        for c in cases}
    with deployment("e2e-chaos", instances=3, restart_dead_instances=True, rebalance=dict(auto=True),
                    request_retries=5) as c:
        done = threading.Event()
        enough = threading.Event()             # MIN_KILLS kills have happened
        kills: list[str] = []
        finished = [0]                         # requests finished, under `lock`
        lock = threading.Lock()

        def chaos():
            # a kill after every KILL_EVERY finished requests, and the last HELD_BACK requests wait for the
            # first MIN_KILLS kills, so the kills land while the load runs however fast this machine is and
            # however long a restart takes (a timer-paced chaos once saw the workload finish after two kills)
            next_at = KILL_EVERY
            while not done.wait(0.2):
                if finished[0] < next_at:
                    continue
                try:
                    views = [v for v in c.deployment.scheduler.list_instances().result()
                             if v.state == "serving"]
                except RemoteError:
                    continue                  # the scheduler is restarting from the last kill
                what = rng.choice(["ray.kill", "sigkill", "scheduler"])
                if what == "scheduler":
                    c.deployment.scheduler.kill(restart=True)
                elif len(views) >= 2:
                    victim = rng.choice(views)
                    if what == "sigkill":
                        os.kill(victim.info.pid, signal.SIGKILL)
                    else:
                        victim.client.kill()
                else:
                    continue                  # a killed instance is still restarting: try again shortly
                kills.append(what)
                if len(kills) >= MIN_KILLS:
                    enough.set()
                next_at += KILL_EVERY

        def run(case):
            if int(case["request_id"].split("-")[1]) >= N_REQUESTS - HELD_BACK:
                enough.wait(240)
            try:
                return case["request_id"], c.generate(timeout=180, **case), None
            except grpc.RpcError as e:
                return case["request_id"], None, e
            finally:
                with lock:
                    finished[0] += 1

        killer = threading.Thread(target=chaos)
        killer.start()
        try:
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(run, cases))
        finally:
            done.set()
            killer.join(timeout=60)
        assert len(kills) >= MIN_KILLS, f"the chaos did not happen: {kills}"
        identical = 0
        for rid, chunks, err in results:
            if err is not None:
                # a clear status, never a wrong or silently truncated stream
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED), err
                assert err.details()
                continue
            assert [ch.seq for ch in chunks] == list(range(len(chunks))), rid
            assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH, rid
            assert tokens_of(chunks) == expected[rid], rid
            identical += 1
        assert identical >= 0.9 * N_REQUESTS, f"only {identical} of {N_REQUESTS} completed ({kills})"
        deadline = time.monotonic() + 90
        statuses = None
        while True:
            assert time.monotonic() < deadline, f"blocks still held on live instances: {statuses}"
            time.sleep(0.2)
            try:      # the scheduler (or an instance) may still be restarting from the last kill
                views = c.deployment.scheduler.list_instances().result()
                live = [v for v in views if v.state == "serving"]
                statuses = [v.client.get_status().result() for v in live]
            except RemoteError:
                continue
            if live and all(s.load.free_blocks == s.load.total_blocks and s.num_requests == 0 for s in statuses):
                break
