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
