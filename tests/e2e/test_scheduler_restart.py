"""The GlobalScheduler dies under load: serving goes on, and Ray brings it back with the same instance table and
drains, from the state store (Ray's GCS KV by default, or a real redis-server)."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rpc import ActorDead
from tests.e2e.helpers import deployment, tokens_of
from tests.redis_server import RedisServer
from tidal.v1 import admin_pb2, generation_pb2


def table(c) -> dict[str, tuple[str, str]]:
    return {v.instance_id: (v.state, v.role)
            for v in c.deployment.scheduler.list_instances().result()}


@pytest.mark.parametrize("store", ["ray", "redis"])
def test_killing_the_scheduler_under_load_keeps_serving_and_it_comes_back_with_its_state(ray_local, tmp_path,
                                                                                       store):
    redis = RedisServer(tmp_path) if store == "redis" else None
    if redis:
        redis.start()
    try:
        with deployment(f"e2e-sched-{store}", instances=3, rebalance=dict(auto=False),
                        state_store=redis.url if redis else None) as c:
            c.admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="instance-2"), timeout=60)
            c.admin.SetRole(admin_pb2.SetRoleRequest(instance_id="instance-1", role=admin_pb2.INSTANCE_ROLE_DECODE),
                            timeout=30)
            before = table(c)
            assert before == {"instance-0": ("serving", "both"), "instance-1": ("serving", "decode"),
                              "instance-2": ("draining", "both")}
            with ThreadPoolExecutor(6) as pool:
                futures = [pool.submit(c.generate, timeout=120, prompt=f"under load {i}", max_tokens=400,
                                       ignore_eos=True) for i in range(3)]
                time.sleep(0.5)
                c.deployment.scheduler.kill(restart=True)        # Ray restarts it (max_restarts=-1)
                # while it is down or restarting, new requests are still dispatched on the last table
                futures += [pool.submit(c.generate, timeout=120, prompt=f"during restart {i}", max_tokens=50,
                                        ignore_eos=True) for i in range(3)]
                results = [f.result() for f in futures]
            assert all(r[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH for r in results)
            assert all(len(tokens_of(r)) in (400, 50) for r in results)
            assert not {ch.instance_id for r in results for ch in r} & {"instance-2"}     # still not dispatched to
            # Ray restarts it; the frontend's re-registration makes it reload its table from the store
            deadline = time.monotonic() + 60
            after = {}
            while after != before:
                assert time.monotonic() < deadline, f"the scheduler did not come back as it was: {after}"
                time.sleep(0.2)
                try:
                    after = table(c)
                except ActorDead:
                    pass
            # the frontend registered again: admin commands and fresh loads flow through the new scheduler
            deadline = time.monotonic() + 30
            while c.instances()["instance-2"].state != admin_pb2.INSTANCE_STATE_DRAINING or \
                    c.instances()["instance-0"].load_age_s > 1.0:
                assert time.monotonic() < deadline, "the frontend never got tables from the restarted scheduler"
                time.sleep(0.1)
            c.admin.UndrainInstance(admin_pb2.UndrainInstanceRequest(instance_id="instance-2"), timeout=30)
            assert table(c)["instance-2"] == ("serving", "both")
            c.wait_all_blocks_free()
    finally:
        if redis:
            redis.stop()


def test_the_scheduler_killed_while_redis_is_down_comes_back_serves_and_writes_its_state_when_redis_returns(
        ray_local, tmp_path):
    from orchestrator.store import open_store

    redis = RedisServer(tmp_path, appendonly=False)     # what redis holds dies with it: the scheduler must rewrite it
    redis.start()
    try:
        with deployment("e2e-sched-down", instances=3, rebalance=dict(auto=False), state_store=redis.url) as c:
            c.admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="instance-2"), timeout=60)
            c.admin.SetRole(admin_pb2.SetRoleRequest(instance_id="instance-1", role=admin_pb2.INSTANCE_ROLE_DECODE),
                            timeout=30)
            before = table(c)
            redis.kill()
            c.deployment.scheduler.kill(restart=True)        # Ray restarts it into a world without its store
            results = [c.generate(timeout=120, prompt=f"store down {i}", max_tokens=20, ignore_eos=True)
                       for i in range(3)]
            assert all(len(tokens_of(r)) == 20 for r in results)
            assert not {ch.instance_id for r in results for ch in r} & {"instance-2"}
            deadline = time.monotonic() + 90
            after, cp = {}, None
            while after != before or cp is None or cp.state_store_reachable or not cp.scheduler_reachable:
                assert time.monotonic() < deadline, f"the scheduler did not come back as it was: {after}, {cp}"
                time.sleep(0.2)
                try:
                    after = table(c)
                except ActorDead:
                    continue
                cp = c.admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10).control_plane
            assert "cannot reach redis" in cp.state_store_error and cp.state_store == redis.url
            redis.start()                                     # empty: its data died with it
            store = open_store(redis.url, "e2e-sched-down")
            deadline = time.monotonic() + 60
            while True:
                saved = {k: (v["state"], v["role"]) for k, v in store.scan("instance/").items()}
                if saved == {f"instance/{i}": s for i, s in before.items()}:
                    break
                assert time.monotonic() < deadline, f"the scheduler did not write its state back: {saved}"
                time.sleep(0.2)
            store.close()
            c.admin.UndrainInstance(admin_pb2.UndrainInstanceRequest(instance_id="instance-2"), timeout=30)
            assert table(c)["instance-2"] == ("serving", "both")
            c.wait_all_blocks_free()
    finally:
        redis.stop()
