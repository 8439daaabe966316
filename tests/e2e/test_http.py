"""The OpenAI-compatible HTTP API of a real tiny-llama deployment, driven by the official `openai` client (and
plain HTTP for what a client library would never send): completions and chat, streaming and not, equal to
the gRPC stream; errors in OpenAI's body; live migration and failover invisible mid-stream; a client that
disconnects frees its blocks. One deployment for the module; the failover test kills an instance, so it runs
last (--restart-dead-instances brings it back)."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.error
import urllib.request

from pathlib import Path

import httpx
import openai
import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from tests.e2e.helpers import TINY, assert_resumed_identically, deployment, reference_with_margins, tokens_of
from tests.prometheus_server import PrometheusServer
from tidal.v1 import admin_pb2

MODEL = "tiny-llama"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tidal.json"


@pytest.fixture(scope="module")
def served(ray_local):
    with deployment("e2e-http", restart_dead_instances=True, rebalance=dict(auto=False)) as c:
        c.base = f"http://127.0.0.1:{c.deployment.http_port}"
        yield c


@pytest.fixture(scope="module")
def prom(served, tmp_path_factory):
    """A real Prometheus scraping the frontend's /metrics every second, from the module's first test on."""
    with PrometheusServer(tmp_path_factory.mktemp("prometheus"), [served.base.removeprefix("http://")]) as p:
        yield p


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=60)


def post(base: str, path: str, body: bytes | dict, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(base: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(base + path, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def grpc_text(served, **fields) -> tuple[str, list]:
    chunks = served.generate(**fields)
    return "".join(c.text for c in chunks), chunks


def test_completions_streamed_and_whole_equal_the_grpc_stream(served, client, prom):
    fields = dict(prompt="The tide comes in", max_tokens=24, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    expected, chunks = grpc_text(served, **fields)
    whole = client.completions.create(model=MODEL, prompt=fields["prompt"], max_tokens=24, temperature=0.8,
                                      top_p=0.9, seed=7, extra_body={"ignore_eos": True})
    assert whole.choices[0].text == expected and whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    assert whole.usage.completion_tokens == 24 and whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    stream = client.completions.create(model=MODEL, prompt=fields["prompt"], max_tokens=24, temperature=0.8,
                                       top_p=0.9, seed=7, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    events = list(stream)
    assert "".join(e.choices[0].text for e in events if e.choices) == expected
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert sum(1 for e in events if e.choices and e.choices[0].finish_reason) == 1
    assert events[-1].choices == [] and events[-1].usage.completion_tokens == 24
    assert all(e.usage is None for e in events[:-1])
    tokenized = post(served.base, "/tokenize", {"model": MODEL, "prompt": fields["prompt"]})[1]
    assert tokenized["count"] == whole.usage.prompt_tokens == len(tokenized["tokens"])
    assert post(served.base, "/detokenize", {"tokens": tokens_of(chunks)})[1]["prompt"] == expected


def test_chat_async_streamed_and_whole_equal_the_grpc_stream(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the sea go?"}]
    expected, chunks = grpc_text(served, chat=[(m["role"], m["content"]) for m in messages], max_tokens=20,
                                 temperature=0.0, ignore_eos=True)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key="unused", max_retries=0, timeout=60)
        whole = await aclient.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=20,
                                                      temperature=0, extra_body={"ignore_eos": True})
        stream = await aclient.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                       stream=True, extra_body={"ignore_eos": True})
        events = [e async for e in stream]
        await aclient.close()
        return whole, events

    whole, events = asyncio.run(run())
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == expected
    assert whole.usage.completion_tokens == 20 and whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == expected
    assert [e.choices[0].finish_reason for e in events][-1] == "length"


def test_models_health_version(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert get(served.base, "/health")[0] == 200 and get(served.base, "/live")[0] == 200
    status, body = get(served.base, "/version")
    assert status == 200 and json.loads(body)["version"]


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "hi"}, 400, "model"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "top_p": 2}, 400, "top_p"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL}, 400, "prompt"),
])
def test_bad_completions_get_openai_errors_naming_the_field(served, body, status, param):
    got, err = post(served.base, "/v1/completions", body)
    assert got == status, err
    assert err["error"]["param"] == param and param in err["error"]["message"], err
    assert err["error"]["code"] == status and err["error"]["type"]


def test_bad_bodies_and_chat_get_openai_errors_and_serving_goes_on(served, client):
    cases = [
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "application/json", 400, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True},
         "application/json", 400, "logprobs"),
        ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', "application/json", 400, "body"),
        ("/v1/completions", b"model=tiny-llama&prompt=hi", "application/x-www-form-urlencoded", 415, "Content-Type"),
        ("/v1/completions", b'{"model": "tiny-llama", "prompt": "' + b"a" * (10 << 20) + b'"}', "application/json",
         413, "body"),
    ]
    for path, body, ctype, status, param in cases:
        got, err = post(served.base, path, body, ctype)
        assert got == status and err["error"]["param"] == param, (path, ctype, got, err)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert get(served.base, "/v1/nothing")[0] == 404
    assert client.completions.create(model=MODEL, prompt="still serving", max_tokens=4).usage.completion_tokens > 0


def test_a_request_migrated_mid_stream_gives_one_continuous_answer(served, client):
    prompt, n = "migrate me over http", 300
    expected = Engine(**TINY).generate([prompt], SamplingParams(max_tokens=n, temperature=0.0,
                                                                ignore_eos=True))[0].new_token_ids
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True, "request_id": "http-mig",
                                                   "return_token_ids": True})
    ids = []
    while len(ids) < 10:
        ids += next(stream).choices[0].model_extra["token_ids"]
    resp = served.admin.MigrateRequest(admin_pb2.MigrateRequestRequest(request_id="http-mig"), timeout=60)
    assert resp.migration.state == admin_pb2.MIGRATION_STATE_COMMITTED, resp
    for event in stream:
        ids += event.choices[0].model_extra["token_ids"]
    assert ids == expected
    served.wait_all_blocks_free()


def ended(base: str, outcome: str) -> float:
    """tidal_requests_total{outcome=...} on the frontend's /metrics now."""
    text = get(base, "/metrics")[1].decode()
    found = re.search(rf'^tidal_requests_total{{outcome="{outcome}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_ended(base: str, outcome: str, at_least: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while ended(base, outcome) < at_least:
        assert time.monotonic() < deadline, f"no request ended {outcome} within {timeout} s"
        time.sleep(0.05)


def test_a_client_that_disconnects_aborts_its_request(served):
    cancelled = ended(served.base, "cancelled")
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{served.base}/v1/completions",
                         json={"model": MODEL, "prompt": "leave early", "max_tokens": 900, "stream": True,
                               "ignore_eos": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
    wait_ended(served.base, "cancelled", cancelled + 1)      # ended by the disconnect, not by its 900 tokens
    served.wait_all_blocks_free(timeout=15)
    # a whole (non-streamed) request whose client gives up is aborted too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.base}/v1/completions", timeout=1.0,
                   json={"model": MODEL, "prompt": "leave early", "max_tokens": 900, "ignore_eos": True})
    wait_ended(served.base, "cancelled", cancelled + 2)
    served.wait_all_blocks_free(timeout=15)


def test_an_instance_killed_mid_stream_is_invisible_to_the_http_client(served, client):
    prompt, n = "fail over over http", 400
    params = SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    expected, margins = reference_with_margins(Engine(**TINY), prompt, params)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0.8, top_p=0.95,
                                       seed=11, stream=True, extra_body={"ignore_eos": True, "request_id": "http-fo",
                                                                          "return_token_ids": True})
    ids = []
    while len(ids) < 10:
        ids += next(stream).choices[0].model_extra["token_ids"]
    deadline = time.monotonic() + 10
    while True:
        holders = [v for v in served.deployment.scheduler.list_instances().result()
                   if v.status is not None and any(r.request_id == "http-fo" for r in v.status.requests)]
        if holders:
            break
        assert time.monotonic() < deadline, "no instance lists the request"
        time.sleep(0.05)
    holder = holders[0]
    holder.client.kill()
    finish = None
    for event in stream:
        ids += event.choices[0].model_extra["token_ids"]
        finish = event.choices[0].finish_reason or finish
    assert finish == "length"
    assert_resumed_identically(ids, expected, margins, "http-fo")


def test_a_deadline_gives_504_before_streaming_and_an_error_event_after(served, client):
    got, err = post(served.base, "/v1/completions", {"model": MODEL, "prompt": "too slow", "max_tokens": 1000,
                                                     "ignore_eos": True, "timeout": 0.3})
    assert got == 504 and err["error"]["param"] == "timeout", err
    stream = client.completions.create(model=MODEL, prompt="too slow", max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True, "timeout": 4.0})
    text = []
    with pytest.raises(openai.APIError) as e:
        for event in stream:
            text.append(event.choices[0].text)
    assert text and "timeout" in e.value.message, e.value
    served.wait_all_blocks_free(timeout=15)


def test_bench_replay_over_http_records_every_token(served):
    from instance.model.loader import load_tokenizer
    from orchestrator.bench.replay import Progress, PromptSource, Replay, run_http
    from orchestrator.bench.schedule import PlannedRequest

    plan = [PlannedRequest(i, 0.05 * i, 20 + i, 12 + i) for i in range(6)]
    replay = Replay(plan, PromptSource(load_tokenizer(MODEL), 30, 0), 60.0, Progress(len(plan), enabled=False))
    replay.model = MODEL
    asyncio.run(run_http(replay, served.base, 10.0))
    assert [r.status for r in replay.records] == ["OK"] * 6, [r.error for r in replay.records]
    assert [r.tokens for r in replay.records] == [p.output_tokens for p in plan]
    assert all(r.finish_reason == "LENGTH" and r.chunk_times_s for r in replay.records)


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$__rate_interval", "1m")) for p in panels for t in p.get("targets", [])]


def test_prometheus_scrapes_every_metric_and_every_dashboard_panel_returns_data(served, prom):
    served.admin.ListMigrations(admin_pb2.ListMigrationsRequest(), timeout=10)     # an admin op
    queries = dashboard_queries()
    assert len(queries) >= 20
    used = {re.sub(r"_(bucket|total)$", "", m) for _, e in queries for m in re.findall(r"\btidal_[a-z0-9_]+", e)}
    raw = [(name, name if name in GAUGES else f"{name}_total" if name in COUNTERS else f"{name}_count")
           for name in sorted(used)]
    assert set(GAUGES) | set(COUNTERS) | set(HISTOGRAMS) == used, "a metric the test does not know, or unused"
    deadline = time.monotonic() + 60
    while True:
        missing = [(what, expr) for what, expr in [*queries, *raw] if not prom.query(expr)]
        if not missing:
            break
        assert time.monotonic() < deadline, f"no series after 60 s for: {missing}; targets {prom.targets_up()}"
        time.sleep(1)
    value = lambda expr: float(prom.query(expr)[0]["value"][1])  # noqa: E731
    assert value('sum(tidal_requests_total{outcome="length"})') >= 8
    assert value('sum(tidal_requests_total{outcome="invalid_argument"})') >= 5
    assert value('sum(tidal_migrations_total{reason="operator", outcome="committed"})') >= 1
    assert value('sum(tidal_failovers_total{outcome="resumed"})') >= 1
    assert value("sum(tidal_migration_downtime_seconds_count)") >= 1
    assert value('sum(tidal_admin_operations_total{op="migrate", outcome="ok"})') >= 1
    assert value("sum(tidal_generation_tokens_total)") >= 1000
    assert value("count(tidal_instance_up)") == 2
    usage = [float(r["value"][1]) for r in prom.query("tidal_instance_kv_cache_usage")]
    assert usage and all(0 <= u <= 1 for u in usage)       # the killed instance's replacement may be starting


GAUGES = ("tidal_requests_running", "tidal_requests_waiting", "tidal_frontend_streams", "tidal_instance_up",
          "tidal_instance_kv_cache_usage", "tidal_instance_requests_running", "tidal_instance_requests_waiting",
          "tidal_instance_tokens_per_second", "tidal_instance_prefix_cached_blocks")
COUNTERS = ("tidal_requests", "tidal_prompt_tokens", "tidal_generation_tokens", "tidal_instance_preemptions",
            "tidal_instance_prefix_cache_hit_tokens", "tidal_instance_prefix_cache_query_tokens",
            "tidal_migrations", "tidal_failovers", "tidal_admin_operations")
HISTOGRAMS = ("tidal_time_to_first_token_seconds", "tidal_inter_token_latency_seconds",
              "tidal_e2e_request_latency_seconds", "tidal_request_queue_time_seconds",
              "tidal_migration_downtime_seconds", "tidal_migration_duration_seconds", "tidal_reconcile_step_seconds")


def test_health_is_503_and_streams_get_an_error_event_while_the_frontend_shuts_down(served, client):
    stream = client.completions.create(model=MODEL, prompt="cut short", max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True})
    next(stream)
    shutdown = served.deployment.frontend.shutdown(0.5)
    deadline = time.monotonic() + 10
    while get(served.base, "/health")[0] != 503:
        assert time.monotonic() < deadline, "/health still 200 while shutting down"
        time.sleep(0.02)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="too late", max_tokens=4)
    assert e.value.status_code == 503
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "shutting down" in e.value.message
    assert shutdown.result() == 1


def test_a_pd_hand_over_is_invisible_to_the_http_client(ray_local):
    prompt, n = "prefill here, decode there", 600
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    expected, margins = reference_with_margins(Engine(**{**TINY, "num_blocks": 512}), prompt, params)
    with deployment("e2e-http-pd", engine={"num_blocks": 512}, prefill_instances=1, decode_instances=1) as c:
        base = f"http://127.0.0.1:{c.deployment.http_port}"
        pd_client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = pd_client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True, "return_token_ids": True})
        ids, finish = [], None
        for event in stream:
            ids += event.choices[0].model_extra["token_ids"]
            finish = event.choices[0].finish_reason or finish
        assert finish == "length"
        assert_resumed_identically(ids, expected, margins, "pd over http")
        text = get(base, "/metrics")[1].decode()
        handed = re.search(r'^tidal_migrations_total{outcome="committed",reason="pd_handoff"} (\S+)$', text, re.M)
        assert handed and float(handed.group(1)) >= 1, "no hand-over was committed"
