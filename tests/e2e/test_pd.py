"""Prefill/decode disaggregation end to end: prefill on one instance, decode on another, over real gRPC."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from migration.protocol import MigrationConfig
from orchestrator import cli
from tests.e2e.helpers import (TINY, deployment, request,
                               tokens_of)
from tidal.v1 import admin_pb2, generation_pb2

# the tiny model makes a token in about a millisecond: streams long enough to outlast the scheduler's 50 ms
# polls and a cold first transfer; blocks for all of them on one decode instance
N_TOKENS = 600
# deterministic engines: every stream, handed over or not, batched or not, gives a lone run's tokens exactly
ENGINE = {"num_blocks": 512, "deterministic": True}
MIGRATION = MigrationConfig(max_concurrent=8)                # all six hand over at once


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**{**TINY, **ENGINE})


def cases(n: int, tag: str) -> list[dict]:
    """Half greedy, half seeded; prompts long enough to take a few prefill chunks in some cases."""
    out = []
    for i in range(n):
        c = dict(prompt=f"pd {tag} request {i} " + "tell me about rivers and bridges " * i,
                 max_tokens=N_TOKENS, ignore_eos=True, request_id=f"pd-{tag}-{i}")
        if i % 2:
            c.update(temperature=0.8, top_p=0.95, seed=300 + i)
        out.append(c)
    return out


def expected(reference: Engine, case: dict) -> list[int]:
    params = SamplingParams(max_tokens=case["max_tokens"], temperature=case.get("temperature", 0.0),
                            top_p=case.get("top_p", 1.0), seed=case.get("seed"), ignore_eos=True)
    return reference.generate([case["prompt"]], params)[0].new_token_ids


def run_all(c, todo: list[dict], during=None) -> list[list]:
    """Stream every case at once; `during()` runs once they have all started."""
    started = set()

    def consume(case):
        chunks = []
        for chunk in c.gen.Generate(request(**case), timeout=120):
            chunks.append(chunk)
            started.add(case["request_id"])
        return chunks

    with ThreadPoolExecutor(len(todo)) as pool:
        futures = [pool.submit(consume, case) for case in todo]
        if during is not None:
            deadline = time.monotonic() + 60
            while len(started) < len(todo):
                assert time.monotonic() < deadline, "streams did not start"
                time.sleep(0.01)
            during()
        return [f.result() for f in futures]


def check(reference, todo, results) -> None:
    for case, chunks in zip(todo, results):
        assert [ch.seq for ch in chunks] == list(range(len(chunks))), case["request_id"]
        assert tokens_of(chunks) == expected(reference, case), case["request_id"]     # exactly a lone run's
        assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH


def roles(c) -> dict[str, str]:
    return {i.instance_id: admin_pb2.InstanceRole.Name(i.role) for i in c.instances().values()}


def test_requests_prefill_on_the_prefill_instance_and_decode_on_the_decode_instance(ray_local, reference):
    with deployment("e2e-pd", engine=ENGINE, migration=MIGRATION, prefill_instances=1,
                    decode_instances=1) as c:
        assert roles(c) == {"instance-0": "INSTANCE_ROLE_PREFILL", "instance-1": "INSTANCE_ROLE_DECODE"}
        todo = cases(6, "split")
        results = run_all(c, todo)
        check(reference, todo, results)
        for case, chunks in zip(todo, results):
            # prefill and the first tokens on instance-0 (until the scheduler's next look; the tiny model makes
            # a token in about a millisecond, loads are polled every 50 ms), one move, the rest on instance-1
            where = [ch.instance_id for ch in chunks]
            assert "instance-1" in where, case["request_id"]
            switch = where.index("instance-1")
            assert where[0] == "instance-0" and set(where[switch:]) == {"instance-1"}, case["request_id"]
        migrations = c.admin.ListMigrations(admin_pb2.ListMigrationsRequest(), timeout=10)
        handed = {m.request_id for m in migrations.recent if m.state == admin_pb2.MIGRATION_STATE_COMMITTED
                  and m.src == "instance-0" and m.dst == "instance-1"}
        assert handed >= {case["request_id"] for case in todo}
        c.wait_all_blocks_free()


def test_changing_roles_under_load_loses_nothing(ray_local, reference):
    with deployment("e2e-pd-roles", engine=ENGINE, migration=MIGRATION) as c:
        assert set(roles(c).values()) == {"INSTANCE_ROLE_BOTH"}
        addr = f"127.0.0.1:{c.deployment.port}"

        def flip():
            assert cli.main(["set-role", "instance-0", "prefill", "--addr", addr]) == 0
            assert cli.main(["set-role", "instance-1", "decode", "--addr", addr]) == 0
            time.sleep(0.5)
            assert cli.main(["set-role", "instance-0", "decode", "--addr", addr]) == 0
            assert cli.main(["set-role", "instance-1", "prefill", "--addr", addr]) == 0

        todo = cases(8, "flip")
        check(reference, todo, run_all(c, todo, during=flip))
        assert roles(c) == {"instance-0": "INSTANCE_ROLE_DECODE", "instance-1": "INSTANCE_ROLE_PREFILL"}
        # what no longer fit moved: nothing is left decoding on the prefill instance
        todo = cases(4, "after")
        results = run_all(c, todo)
        check(reference, todo, results)
        assert all(chunks[0].instance_id == "instance-1" for chunks in results)
        assert all(chunks[-1].instance_id == "instance-0" for chunks in results)
        c.wait_all_blocks_free()
        with pytest.raises(SystemExit) as bad:
            cli.main(["set-role", "instance-0", "decoder", "--addr", addr])
        assert bad.value.code == 2


def test_set_role_errors_are_clear(ray_local):
    with deployment("e2e-pd-errors") as c:
        import grpc

        with pytest.raises(grpc.RpcError) as err:
            c.admin.SetRole(admin_pb2.SetRoleRequest(instance_id="instance-9", role=admin_pb2.INSTANCE_ROLE_DECODE),
                            timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            c.admin.SetRole(admin_pb2.SetRoleRequest(instance_id="instance-0"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill" in err.value.details()


def test_with_every_decode_instance_dead_prefill_instances_decode(ray_local, reference):
    with deployment("e2e-pd-dead", prefill_instances=1, decode_instances=1) as c:
        victim = {v.instance_id: v for v in c.deployment.scheduler.list_instances().result()}["instance-1"]
        todo = cases(6, "dead")
        check(reference, todo, run_all(c, todo, during=victim.client.kill))
        # later requests are served by the prefill instance from start to end
        todo = cases(3, "alone")
        results = run_all(c, todo)
        check(reference, todo, results)
        assert {ch.instance_id for chunks in results for ch in chunks} == {"instance-0"}
        c.wait_for_load("instance-0", lambda l: l.free_blocks == l.total_blocks and l.num_running == 0)
