"""Two tiny-llama instances behind the scheduler and a gRPC frontend, on a real local Ray, over loopback."""

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from instance.engine import Engine
from instance.sampling import SamplingParams
from tests.e2e.helpers import TINY, deployment, request, tokens_of
from tidal.v1 import generation_pb2

PROMPTS = ["hello world", "the quick brown fox", "tidal moves requests", "a", "zzz" * 20, "ünïcödé ✓", "42",
           "one more prompt"]


@pytest.fixture(scope="module")
def client(ray_local):
    with deployment("e2e") as c:
        yield c


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**TINY)


def test_health_is_serving_and_reflection_lists_the_services(client):
    health = health_pb2_grpc.HealthStub(client.channel)
    for service in ("", "tidal.v1.GenerationService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"tidal.v1.GenerationService", "tidal.v1.AdminService", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_streamed_tokens_equal_the_engines_direct_output(client, reference, params):
    sp = SamplingParams(max_tokens=24, temperature=params["temperature"], top_p=params.get("top_p", 1.0),
                        seed=params.get("seed"))
    for prompt in PROMPTS[:4]:
        chunks = client.generate(prompt=prompt, max_tokens=24, **params)
        direct = reference.generate([prompt], sp)[0]
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert tokens_of(chunks) == direct.new_token_ids
        assert "".join(c.text for c in chunks) == direct.text_delta
        last = chunks[-1]
        assert generation_pb2.FinishReason.Name(last.finish_reason) == f"FINISH_REASON_{direct.finish_reason.upper()}"
        assert last.usage.completion_tokens == len(direct.new_token_ids)
        assert last.usage.prompt_tokens == direct.num_prompt_tokens
        assert all(c.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_concurrent_requests_spread_over_both_instances(client):
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: client.generate(prompt=p, max_tokens=64, ignore_eos=True), PROMPTS))
    used = {c.instance_id for chunks in results for c in chunks}
    assert used == {"instance-0", "instance-1"}
    assert all(len(tokens_of(chunks)) == 64 for chunks in results)
    client.wait_all_blocks_free()


def test_chat_messages_are_rendered_with_the_template(client, reference):
    chunks = client.generate(chat=[("user", "hi there")], max_tokens=8)
    text = reference.tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}])
    direct = reference.generate([text], SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert tokens_of(chunks) == direct.new_token_ids


def _long_stream(client, max_tokens: int = 1000, **kw):
    """A stream that runs for seconds, for tests that act while it is in flight."""
    return client.gen.Generate(request(prompt="a long one", max_tokens=max_tokens, ignore_eos=True, **kw),
                               timeout=120)


def test_cancelling_mid_stream_frees_the_requests_blocks(client):
    stream = _long_stream(client)
    first = [next(stream) for _ in range(3)]
    client.wait_for_load(first[0].instance_id, lambda load: load.num_running == 1 and load.used_blocks > 0)
    stream.cancel()
    client.wait_all_blocks_free()


def test_expired_deadline_gives_deadline_exceeded_and_frees_blocks(client):
    with pytest.raises(grpc.RpcError) as err:
        list(client.gen.Generate(request(prompt="slow", max_tokens=900, ignore_eos=True), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    client.wait_all_blocks_free()


def test_abort_rpc_ends_the_stream_and_unknown_ids_are_not_found(client):
    stream = _long_stream(client, request_id="to-abort")
    next(stream)
    resp = client.gen.Abort(generation_pb2.AbortRequest(request_id="to-abort"), timeout=5)
    assert resp.instance_id in ("instance-0", "instance-1")
    rest = list(stream)
    assert rest[-1].finish_reason == generation_pb2.FINISH_REASON_ABORT
    client.wait_all_blocks_free()
    with pytest.raises(grpc.RpcError) as err:
        client.gen.Abort(generation_pb2.AbortRequest(request_id="to-abort"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("fields, field_name", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=-3), "max_tokens"),
    (dict(prompt="x" * 1100, max_tokens=10), "prompt"),
    (dict(prompt="hi", top_p=1.5), "top_p"),
    (dict(prompt="hi", temperature=-1.0), "temperature"),
    (dict(chat=[("wizard", "hi")]), "wizard"),
    (dict(chat=[]), "prompt"),
    (dict(token_ids=[1, 2, 99999]), "prompt_token_ids"),
    (dict(), "prompt"),
])
def test_bad_input_is_invalid_argument_naming_the_field_and_serving_goes_on(client, fields, field_name):
    with pytest.raises(grpc.RpcError) as err:
        client.generate(**{"max_tokens": 8, **fields})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in err.value.details()
    assert len(tokens_of(client.generate(prompt="still serving", max_tokens=4))) == 4


def test_duplicate_running_request_id_is_refused(client):
    stream = _long_stream(client, request_id="dup")
    next(stream)
    with pytest.raises(grpc.RpcError) as err:
        client.generate(prompt="again", request_id="dup")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    stream.cancel()
    client.wait_all_blocks_free()


def test_overload_is_resource_exhausted_and_shutdown_is_graceful(ray_local):
    # one running slot and one queue place per instance: the fifth concurrent request finds every queue full
    # 4000-token requests keep every slot and queue place taken for the whole test, even on a fast machine
    with deployment("e2e-small", engine=dict(max_num_seqs=1, max_model_len=4096), max_queue_per_instance=1,
                    rebalance=dict(auto=False)) as c:
        streams = [_long_stream(c, max_tokens=4000) for _ in range(4)]
        for iid in ("instance-0", "instance-1"):
            c.wait_for_load(iid, lambda load: load.num_running == 1 and load.num_waiting == 1)
        with pytest.raises(grpc.RpcError) as err:
            c.generate(prompt="one too many", max_tokens=4)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # graceful shutdown: health flips to NOT_SERVING at once; what is still running is aborted after grace
        health = health_pb2_grpc.HealthStub(c.channel)
        shutdown = c.deployment.frontend.shutdown(0.5)
        time.sleep(0.2)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            c.generate(prompt="late", max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for s in streams:
            with pytest.raises(grpc.RpcError) as err:
                list(s)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert shutdown.result() == 4
        views = c.deployment.scheduler.list_instances().result()
        loads = [v.client.get_status().result() for v in views]
        assert all(s.load.free_blocks == s.load.total_blocks and s.num_requests == 0 for s in loads)
