"""The HTTP API's statuses for what an e2e deployment rarely shows on demand — overload (429), no instance
(503), not serving yet (/health 503) — through the real FastAPI app over an in-process frontend whose instance
table says so; and the dashboard's expressions and the scrape config checked by promtool (tests/e2e/test_http.py
runs them on a real Prometheus)."""

import asyncio
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from orchestrator.fleet import DEAD
from orchestrator.http.app import build_app
from tests.unit.test_frontend_faults import FakeInstance, make_frontend, view

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4}


def call(fe, method: str, path: str, body=None) -> tuple[int, dict]:
    async def go():
        transport = httpx.ASGITransport(app=build_app(fe))
        async with httpx.AsyncClient(transport=transport, base_url="http://tidal") as http:
            r = await http.request(method, path, json=body)
            return r.status_code, r.json()

    return asyncio.run(go())


def test_a_full_queue_is_429_and_no_serving_instance_is_503_in_openai_bodies():
    fe = make_frontend(max_queue_per_instance=2)
    inst = FakeInstance("instance-0", fe)
    full = view(inst)
    fe.views = {"instance-0": replace(full, status=replace(full.status, load=replace(full.status.load,
                                                                                     num_waiting=2)))}
    status, body = call(fe, "POST", "/v1/completions", BODY)
    assert status == 429 and body["error"]["type"] == "rate_limit_error" and "queued" in body["error"]["message"]

    fe.views = {"instance-0": view(inst, state=DEAD)}
    status, body = call(fe, "POST", "/v1/chat/completions",
                        {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 503 and "no instance" in body["error"]["message"], body
    assert not inst.calls                                # nothing was sent anywhere
    status, body = call(fe, "POST", "/v1/completions", {"prompt": "no model"})
    assert status == 400 and body["error"]["param"] == "model"
    text = fe.metrics.exposition()[0].decode()
    for outcome in ("resource_exhausted", "unavailable", "invalid_argument"):
        assert f'tidal_requests_total{{outcome="{outcome}"}} 1.0' in text, text
    assert 'tidal_instance_up{instance="instance-0",node="node",role="both",state="dead"} 1.0' in text


def test_health_is_503_until_the_frontend_accepts_and_a_whole_answer_comes_back_once_it_does():
    fe = make_frontend()
    fe.accepting = False
    inst = FakeInstance("instance-0", fe, tokens=3)
    fe.views = {"instance-0": view(inst)}
    assert call(fe, "GET", "/health")[0] == 503
    status, body = call(fe, "POST", "/v1/completions", BODY)
    assert status == 503 and "not serving" in body["error"]["message"]
    fe.accepting = True
    assert call(fe, "GET", "/health")[0] == 200
    status, body = call(fe, "POST", "/v1/completions", BODY)
    assert status == 200 and body["choices"][0]["text"] == "xxx" and body["choices"][0]["finish_reason"] == "length"
    assert [m for m, _ in inst.calls] == ["add_request"]


def test_a_busy_http_port_is_an_error_that_names_it_and_port_0_picks_one():
    import socket

    from orchestrator.http.server import HttpServer

    fe = make_frontend()

    async def go():
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}.*--http-port"):
                await HttpServer(fe, "127.0.0.1", port).start()
        server = HttpServer(fe, "127.0.0.1", 0)
        picked = await server.start()
        try:
            async with httpx.AsyncClient() as http:
                r = await http.get(f"http://127.0.0.1:{picked}/live", timeout=10)
            assert picked > 0 and r.status_code == 200
        finally:
            await server.stop()

    asyncio.run(go())


@pytest.fixture(scope="module")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        raise RuntimeError("promtool (Debian's prometheus package) is needed: apt-get install -y prometheus")
    return path


def test_every_dashboard_expression_parses_and_the_scrape_config_is_valid(promtool, tmp_path):
    dash = json.loads((ROOT / "deploy" / "grafana" / "tidal.json").read_text())
    assert dash["__inputs"][0]["pluginId"] == "prometheus"
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"tidal:panel_{i}", "expr": e.replace("$__rate_interval", "1m")} for i, e in enumerate(exprs)]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))
    out = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([promtool, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# ----- the OpenAI body parser ----------------------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from orchestrator.http.openai import ApiError, parse  # noqa: E402


def test_the_parser_maps_what_clients_send():
    r = parse({"prompt": ["one prompt"], "top_k": -1, "stop": "\n", "seed": 3, "n": 1, "logprobs": None}, chat=False)
    assert r.request.prompt == "one prompt" and r.request.sampling.top_k == 0 and list(r.request.stop) == ["\n"]
    assert r.request.seed == 3 and not r.stream
    r = parse({"prompt": [[1, 2, 3]], "stream": True, "stream_options": {"include_usage": True}}, chat=False)
    assert list(r.request.token_ids.ids) == [1, 2, 3] and r.stream and r.include_usage
    r = parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
               "max_completion_tokens": 5, "priority": 2, "request_id": "r-1"}, chat=True)
    assert r.request.chat.messages[0].content == "ab" and r.request.max_tokens == 5
    assert (r.request.priority, r.request.request_id) == (2, "r-1")
    for body, param in [({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "seed": -1}, "seed"),
                        ({"prompt": "a", "echo": True}, "echo"), ({"prompt": "a", "tools": [{}]}, "tools"),
                        ({"prompt": "a", "frequency_penalty": 0.5}, "frequency_penalty"),
                        ({"prompt": "a", "temperature": "hot"}, "temperature"), ({"prompt": "a", "stream": 1}, "stream"),
                        ({"prompt": "a", "max_tokens": 2**40}, "max_tokens"), ({"prompt": "a", "timeout": 0}, "timeout")]:
        with pytest.raises(ApiError) as e:
            parse(body, chat=False)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.body())


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
KEYS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
        "stop", "n", "logprobs", "stream", "stream_options", "priority", "request_id", "timeout", "ignore_eos",
        "return_token_ids", "response_format", "best_of"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=8), st.booleans())
def test_any_json_body_parses_or_is_refused_with_a_400_naming_a_field(body, chat):
    try:
        parse(body, chat=chat)
    except ApiError as e:
        assert e.status == 400 and e.param and e.message.startswith(e.param.split("[")[0]), e.body()
