"""The state store on both backends: Ray's GCS KV (a local Ray) and a real redis-server."""

import time
import uuid

import pytest

from orchestrator.store import RayKVStore, RedisStore, StoreError, open_store
from tests.redis_server import RedisServer, free_port


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["ray", "redis"])
def open_deployment(request):
    """open_deployment() -> a store for a fresh deployment name, on the parametrized backend."""
    url = "ray" if request.param == "ray" else request.getfixturevalue("redis_server").url
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    opened = []

    def open_deployment(deployment=None):
        opened.append(open_store(url, deployment or f"t-{uuid.uuid4().hex[:8]}"))
        return opened[-1]

    yield open_deployment
    for store in opened:
        for key in store.scan():
            store.delete(key)
        store.close()


def test_put_get_delete_scan(open_deployment):
    store = open_deployment()
    assert store.get("instances/a") is None and store.scan() == {}
    store.put("instances/a", {"actor": "tidal-instance-a", "role": "both"})
    store.put("instances/b", {"actor": "tidal-instance-b", "role": "decode", "drain": True})
    store.put("ops/migrate-1", {"src": "a", "dst": "b", "stage": 2, "nested": {"ids": [1, 2]}})
    store.put("instances/a", {"actor": "tidal-instance-a", "role": "prefill"})    # overwrite
    assert store.get("instances/a") == {"actor": "tidal-instance-a", "role": "prefill"}
    assert store.scan("instances/") == {"instances/a": {"actor": "tidal-instance-a", "role": "prefill"},
                                        "instances/b": {"actor": "tidal-instance-b", "role": "decode", "drain": True}}
    assert set(store.scan()) == {"instances/a", "instances/b", "ops/migrate-1"}
    assert store.scan("ops/")["ops/migrate-1"]["nested"] == {"ids": [1, 2]}
    assert store.scan("nothing/") == {}
    store.delete("instances/a")
    store.delete("instances/a")    # missing: no error
    assert store.get("instances/a") is None and set(store.scan("instances/")) == {"instances/b"}


def test_glob_characters_in_keys_are_literal(open_deployment):
    store = open_deployment()
    store.put("a*[x]?", {"v": 1})
    store.put("ab", {"v": 2})
    assert store.scan("a*") == {"a*[x]?": {"v": 1}}


def test_deployments_do_not_see_each_others_keys(open_deployment):
    name = f"t-{uuid.uuid4().hex[:8]}"
    one, other, longer = open_deployment(name), open_deployment(name + "x"), open_deployment(name + "-x")
    one.put("k", {"who": "one"})
    other.put("k", {"who": "other"})
    longer.put("k", {"who": "longer"})
    assert one.get("k") == {"who": "one"} and other.get("k") == {"who": "other"}
    assert one.scan() == {"k": {"who": "one"}} and longer.scan() == {"k": {"who": "longer"}}
    one.delete("k")
    assert other.get("k") == {"who": "other"}


@pytest.mark.parametrize("value", [{"when": object()}, {"x": float("nan")}, ["not", "a", "dict"]])
def test_values_that_are_not_json_dicts_are_refused(open_deployment, value):
    store = open_deployment()
    store.put("instances/a", {"ok": True})
    with pytest.raises(TypeError, match="instances/a"):
        store.put("instances/a", value)
    assert store.get("instances/a") == {"ok": True}


def test_redis_state_survives_a_server_restart(tmp_path):
    with RedisServer(tmp_path, appendonly=True) as server:
        store = open_store(server.url, "restart")
        store.put("instances/a", {"actor": "restart-instance-a"})
        store.put("ops/1", {"stage": 1})
        server.restart()
        assert store.scan() == {"instances/a": {"actor": "restart-instance-a"}, "ops/1": {"stage": 1}}
        server.stop()
        with pytest.raises(StoreError, match=f"127.0.0.1:{server.port}"):
            store.get("instances/a")
        server.start()
        assert store.get("instances/a") == {"actor": "restart-instance-a"}    # reconnects by itself
        store.close()


def test_unreachable_redis_is_a_clear_error_within_seconds():
    port = free_port()
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach redis at 127.0.0.1:{port}.*redis-server.*--state-store"):
        open_store(f"redis://127.0.0.1:{port}/0", "tidal")
    assert time.monotonic() - start < 5


def test_open_store_picks_the_backend(redis_server, ray_local):
    for url in (None, "", "ray"):
        store = open_store(url, "tidal")
        assert isinstance(store, RayKVStore) and store.url == "ray-gcs-kv"
    store = open_store(f"redis://127.0.0.1:{redis_server.port}/2", "tidal")
    assert isinstance(store, RedisStore) and store.url == f"redis://127.0.0.1:{redis_server.port}/2"
    store.close()


@pytest.mark.parametrize("url", ["etcd://host:2379", "redis:/no-host", "redis://host:notaport/0",
                                 "redis://127.0.0.1:6379/zero", "memory"])
def test_open_store_rejects_bad_urls(url):
    with pytest.raises(ValueError, match="state_store.*use .*redis://host:port/db"):
        open_store(url, "tidal")


def test_bad_deployment_name_is_refused(redis_server):
    with pytest.raises(ValueError, match="deployment"):
        open_store(redis_server.url, "a:b")


def test_ray_store_without_ray_says_what_to_do(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(StoreError, match=r"ray.init\(\)"):
        RayKVStore("tidal")
