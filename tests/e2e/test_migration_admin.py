"""Drain, undrain, migrate and rebalance over AdminService, with client streams running through them."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from tests.e2e.helpers import TINY, deployment, request, tokens_of
from tidal.v1 import admin_pb2, generation_pb2

LONG = 1000   # tokens per request: seconds of decoding on tiny-llama, so commands land while streams run


@pytest.fixture(scope="module")
def client(ray_local):
    with deployment("e2e-mig", engine=dict(max_num_seqs=8), rebalance=dict(auto=False)) as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**TINY)


def drain(c, iid):
    return c.admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id=iid), timeout=120)


def undrain(c, iid):
    return c.admin.UndrainInstance(admin_pb2.UndrainInstanceRequest(instance_id=iid), timeout=30)


def states(c) -> dict[str, str]:
    return {i: admin_pb2.InstanceState.Name(v.state) for i, v in c.instances().items()}


def test_draining_an_instance_with_8_running_and_4_waiting_empties_it_and_every_stream_completes(client,
                                                                                                  reference):
    prompts = [f"request number {i}" for i in range(12)]
    drain(client, "instance-1")                      # everything lands on instance-0 first
    assert states(client)["instance-1"] == "INSTANCE_STATE_DRAINING"
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(client.generate, timeout=120, prompt=p, max_tokens=LONG, ignore_eos=True,
                               request_id=f"drain-{i}") for i, p in enumerate(prompts)]
        client.wait_for_load("instance-0", lambda l: l.num_running == 8 and l.num_waiting == 4)
        undrain(client, "instance-1")
        report = drain(client, "instance-0")
        assert report.remaining == 0 and not report.not_moved
        assert len(report.moved) == 12
        assert all(m.state == admin_pb2.MIGRATION_STATE_COMMITTED and m.dst == "instance-1" for m in report.moved)
        client.wait_for_load("instance-0", lambda l: l.num_running + l.num_waiting == 0)
        results = [f.result() for f in futures]
    expected = reference.generate(prompts, SamplingParams(max_tokens=LONG, temperature=0.0, ignore_eos=True))
    for chunks, exp in zip(results, expected):
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert tokens_of(chunks) == exp.new_token_ids
        assert "".join(c.text for c in chunks) == exp.text_delta
        assert chunks[-1].instance_id == "instance-1"
    again = drain(client, "instance-0")              # a second drain is harmless
    assert again.remaining == 0 and not again.moved
    undrain(client, "instance-0")
    assert set(states(client).values()) == {"INSTANCE_STATE_SERVING"}
    client.wait_all_blocks_free()


def test_migrate_moves_a_stream_and_an_abort_follows_it(client, reference):
    stream = client.gen.Generate(request(prompt="follow me", max_tokens=LONG, ignore_eos=True,
                                         request_id="follow"), timeout=60)
    first = next(stream)
    src = first.instance_id
    dst = "instance-1" if src == "instance-0" else "instance-0"
    resp = client.admin.MigrateRequest(admin_pb2.MigrateRequestRequest(request_id="follow", to_instance_id=dst),
                                       timeout=60)
    assert resp.migration.state == admin_pb2.MIGRATION_STATE_COMMITTED
    assert (resp.migration.src, resp.migration.dst) == (src, dst)
    moved = next(c for c in stream if c.instance_id == dst)      # the stream goes on from the new instance
    client.gen.Abort(generation_pb2.AbortRequest(request_id="follow"), timeout=10)
    rest = list(stream)
    assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_ABORT
    seqs = [first.seq, moved.seq] + [c.seq for c in rest]
    assert seqs == sorted(seqs)
    client.wait_all_blocks_free()
    listed = client.admin.ListMigrations(admin_pb2.ListMigrationsRequest(), timeout=10)
    assert any(m.request_id == "follow" and m.state == admin_pb2.MIGRATION_STATE_COMMITTED for m in listed.recent)


def test_migrate_without_a_destination_lets_the_scheduler_pick(client, reference):
    stream = client.gen.Generate(request(prompt="pick for me", max_tokens=LONG, ignore_eos=True,
                                         request_id="pick"), timeout=60)
    first = next(stream)
    resp = client.admin.MigrateRequest(admin_pb2.MigrateRequestRequest(request_id="pick"), timeout=60)
    assert resp.migration.state == admin_pb2.MIGRATION_STATE_COMMITTED
    assert resp.migration.src == first.instance_id and resp.migration.dst != first.instance_id
    chunks = [first, *stream]
    expected = reference.generate(["pick for me"], SamplingParams(max_tokens=LONG, temperature=0.0,
                                                                  ignore_eos=True))[0]
    assert tokens_of(chunks) == expected.new_token_ids
    assert [c.seq for c in chunks] == list(range(len(chunks)))


def test_admin_commands_in_the_wrong_state_or_with_unknown_ids(client):
    def code(fn, *args):
        with pytest.raises(grpc.RpcError) as err:
            fn(*args)
        return err.value.code(), err.value.details()

    c, msg = code(drain, client, "instance-9")
    assert c == grpc.StatusCode.NOT_FOUND and "instance-9" in msg
    c, msg = code(undrain, client, "nope")
    assert c == grpc.StatusCode.NOT_FOUND
    c, msg = code(client.admin.MigrateRequest, admin_pb2.MigrateRequestRequest(request_id="no-such-request"))
    assert c == grpc.StatusCode.NOT_FOUND and "no-such-request" in msg

    stream = client.gen.Generate(request(prompt="stay", max_tokens=LONG, ignore_eos=True, request_id="stay"),
                                 timeout=60)
    here = next(stream).instance_id
    other = "instance-1" if here == "instance-0" else "instance-0"
    drain(client, other)
    try:
        c, msg = code(client.admin.MigrateRequest,
                      admin_pb2.MigrateRequestRequest(request_id="stay", to_instance_id=other))
        assert c == grpc.StatusCode.FAILED_PRECONDITION and "draining" in msg
        c, msg = code(client.admin.MigrateRequest,
                      admin_pb2.MigrateRequestRequest(request_id="stay", to_instance_id=here))
        assert c == grpc.StatusCode.FAILED_PRECONDITION and "already" in msg
    finally:
        undrain(client, other)
        stream.cancel()
    assert undrain(client, other).state == admin_pb2.INSTANCE_STATE_SERVING      # harmless when serving
    client.wait_all_blocks_free()


def test_rebalance_reports_moves_when_one_instance_is_overloaded(ray_local, reference):
    # a small KV cache so a few long requests push an instance's freeness under the source threshold
    with deployment("e2e-rebal", engine=dict(num_blocks=96, max_model_len=1024), rebalance=dict(auto=False, source_freeness=8.0, target_freeness=20.0)) as c:
        drain(c, "instance-1")
        streams = [c.gen.Generate(request(prompt=f"load {i}", max_tokens=LONG, ignore_eos=True), timeout=120)
                   for i in range(4)]
        firsts = [next(s) for s in streams]
        assert {f.instance_id for f in firsts} == {"instance-0"}
        undrain(c, "instance-1")
        c.wait_for_load("instance-0", lambda l: (l.free_blocks - l.waiting_demand_blocks) / 4 < 8.0)
        resp = c.admin.Rebalance(admin_pb2.RebalanceRequest(), timeout=60)
        assert resp.migrations and all(m.src == "instance-0" and m.dst == "instance-1" for m in resp.migrations)
        assert any(m.state == admin_pb2.MIGRATION_STATE_COMMITTED for m in resp.migrations)
        for s in streams:
            s.cancel()
        c.wait_all_blocks_free()


def test_the_reconcile_loop_moves_work_off_an_overloaded_instance_by_itself(ray_local):
    with deployment("e2e-auto", engine=dict(num_blocks=96, max_model_len=1024), rebalance=dict(auto=True, interval_s=0.2, source_freeness=8.0, target_freeness=20.0)) as c:
        drain(c, "instance-1")
        streams = [c.gen.Generate(request(prompt=f"auto {i}", max_tokens=LONG, ignore_eos=True), timeout=120)
                   for i in range(4)]
        assert {next(s).instance_id for s in streams} == {"instance-0"}
        undrain(c, "instance-1")
        deadline = time.monotonic() + 30
        while True:
            recent = c.admin.ListMigrations(admin_pb2.ListMigrationsRequest(), timeout=10).recent
            if any(m.state == admin_pb2.MIGRATION_STATE_COMMITTED for m in recent):
                break
            assert time.monotonic() < deadline, "no automatic migration happened"
            time.sleep(0.1)
        assert all(m.src == "instance-0" and m.dst == "instance-1" for m in recent)
        results = [list(s) for s in streams]
        assert all(r[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH for r in results)
        c.wait_all_blocks_free()


def test_rebalance_moves_a_queued_request_to_an_idle_instance_where_it_starts_at_once(ray_local):
    # one batch slot per instance: the second request queues on instance-0 while instance-1 is drained
    with deployment("e2e-queued", engine=dict(max_num_seqs=1), rebalance=dict(auto=False)) as c:
        drain(c, "instance-1")
        first = c.gen.Generate(request(prompt="runs", max_tokens=LONG, ignore_eos=True, request_id="runs"),
                               timeout=120)
        assert next(first).instance_id == "instance-0"
        queued = c.gen.Generate(request(prompt="waits", max_tokens=32, ignore_eos=True, request_id="waits"),
                                timeout=120)
        c.wait_for_load("instance-0", lambda l: l.num_running == 1 and l.num_waiting == 1)
        undrain(c, "instance-1")
        resp = c.admin.Rebalance(admin_pb2.RebalanceRequest(), timeout=60)
        assert [(m.request_id, m.src, m.dst, m.state) for m in resp.migrations] == \
               [("waits", "instance-0", "instance-1", admin_pb2.MIGRATION_STATE_COMMITTED)]
        chunks = list(queued)
        assert {ch.instance_id for ch in chunks} == {"instance-1"}     # it never ran on instance-0
        assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert sum(len(ch.token_ids) for ch in chunks) == 32
        first.cancel()
        c.wait_all_blocks_free()
