"""Autoscaling end to end (tiny-llama, real gRPC): a burst scales the deployment out and it scales back in while
streams run, draining by migration, so every stream completes with an unscaled run's tokens; a scheduler killed
during a scale-in finishes it after its restart; `tidal scale` refuses targets out of range."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from tests.e2e.helpers import TINY, deployment, tokens_of
from tidal.v1 import admin_pb2

ENGINE = dict(num_blocks=128, max_num_seqs=16)        # 2048 tokens of KV: a burst of long streams overfills it


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**{**TINY, **ENGINE})


def expected(reference: Engine, prompt: str, n: int) -> list[int]:
    return reference.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0].new_token_ids


def assert_unscaled_tokens(reference: Engine, results) -> None:
    """Every stream has contiguous seq and the greedy tokens of a run on one unscaled engine (computed in
    batches per length: greedy output does not depend on the batch, tests/unit/test_engine.py)."""
    by_length: dict[int, list[str]] = {}
    for prompt, n, chunks in results:
        assert [ch.seq for ch in chunks] == list(range(len(chunks))), prompt
        by_length.setdefault(n, []).append(prompt)
    want = {}
    for n, prompts in by_length.items():
        outs = reference.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        want.update({p: o.new_token_ids for p, o in zip(prompts, outs)})
    for prompt, _, chunks in results:
        assert tokens_of(chunks) == want[prompt], prompt


def serving(c) -> dict[str, int]:
    return {iid: i.state for iid, i in c.instances().items()}


def control(c):
    return c.admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10).control_plane


def test_a_burst_scales_out_and_the_deployment_scales_back_in_while_streams_run(ray_local, reference):
    autoscale = dict(enabled=True, low_freeness=10, high_freeness=40, scale_up_delay_s=1, scale_down_delay_s=1,
                     cooldown_s=1, interval_s=0.2, min_instances=1, max_instances=3)
    with deployment("e2e-autoscale", instances=1, engine=ENGINE, autoscale=autoscale,
                    rebalance=dict(auto=True, interval_s=0.2)) as c:
        peak, scale_in_at, spans, stop, scaled_in = [1], [], {}, threading.Event(), threading.Event()

        def watch():
            while not stop.wait(0.1):
                peak[0] = max(peak[0], sum(1 for s in serving(c).values() if s == admin_pb2.INSTANCE_STATE_SERVING))
                if not scale_in_at and control(c).scaling.startswith("removing"):
                    scale_in_at.append(time.monotonic())

        def run(prompt: str, n: int):
            started = time.monotonic()
            chunks = c.generate(timeout=300, prompt=prompt, max_tokens=n, ignore_eos=True)
            spans[prompt] = (started, time.monotonic())
            return prompt, n, chunks

        def client(name: str, n: int, until) -> list:
            """Requests one after another while `until()` holds."""
            done, k = [], 0
            while until():
                done.append(run(f"{name}-{k}", n))
                k += 1
            return done

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            with ThreadPoolExecutor(27) as pool:
                end = time.monotonic() + 25
                burst = [pool.submit(client, f"burst {w}", 300, lambda: time.monotonic() < end) for w in range(24)]
                time.sleep(23)                    # the tail: streams that go on through the scale-in
                tail = [pool.submit(client, f"tail {w}", 200, lambda: not scaled_in.is_set()) for w in range(3)]
                results = [r for f in burst for r in f.result()]
                deadline = time.monotonic() + 120
                while len(serving(c)) > 1 or control(c).scaling:
                    assert time.monotonic() < deadline, f"never scaled back in: {serving(c)}, {control(c)}"
                    time.sleep(0.2)
                scaled_in.set()
                results += [r for f in tail for r in f.result()]
        finally:
            stop.set()
            watcher.join()
        assert peak[0] == 3, f"the burst did not scale out to max_instances: peak {peak[0]}"
        assert scale_in_at and any(start < scale_in_at[0] < end for start, end in spans.values()), \
            "no stream was running when the scale-in began"
        assert_unscaled_tokens(reference, results)
        moved = {ch.instance_id for _, _, chunks in results for ch in chunks}
        assert len(moved) >= 2                                 # streams ran on the instances it added
        assert control(c).target_instances == 1 and "average freeness" in control(c).last_scale_decision
        c.wait_all_blocks_free()


def test_a_scheduler_killed_during_a_scale_in_finishes_it_after_its_restart(ray_local, reference):
    with deployment("e2e-scale-kill", instances=1, engine=ENGINE, rebalance=dict(auto=False),
                    autoscale=dict(max_instances=3)) as c:
        for bad in (0, 4):
            with pytest.raises(grpc.RpcError) as err:
                c.admin.ScaleInstances(admin_pb2.ScaleInstancesRequest(instances=bad), timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1 to 3" in err.value.details()
        r = c.admin.ScaleInstances(admin_pb2.ScaleInstancesRequest(instances=3), timeout=300)
        assert (r.previous, r.instances, sorted(r.added)) == (1, 3, ["instance-1", "instance-2"])
        cases = [(f"scale-kill {i}", 700) for i in range(6)]
        with ThreadPoolExecutor(len(cases) + 1) as pool:
            streams = [pool.submit(c.generate, timeout=300, prompt=p, max_tokens=n, ignore_eos=True) for p, n in cases]
            time.sleep(0.5)
            scale = pool.submit(c.admin.ScaleInstances, admin_pb2.ScaleInstancesRequest(instances=1), timeout=300)
            deadline = time.monotonic() + 60
            while "removing" not in control(c).scaling:
                assert time.monotonic() < deadline, "the scale-in never started"
                time.sleep(0.05)
            c.deployment.scheduler.kill(restart=True)         # in the middle of the scale-in
            with pytest.raises(grpc.RpcError):
                scale.result()                                # the command's scheduler died; the operation did not
            results = [f.result() for f in streams]
        deadline = time.monotonic() + 180
        while len(serving(c)) != 1 or control(c).scaling or not control(c).scheduler_reachable:
            assert time.monotonic() < deadline, f"the scale-in was not finished after the restart: {serving(c)}"
            time.sleep(0.2)
        for (prompt, n), chunks in zip(cases, results):
            assert tokens_of(chunks) == expected(reference, prompt, n), prompt
        c.wait_all_blocks_free()
