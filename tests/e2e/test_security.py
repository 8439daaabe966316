"""API keys, admin keys, mutual TLS and the audit log on a real deployment, over real gRPC and the real CLI."""

import json
import os
import ssl
import subprocess
import sys
import time

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instance.config import EngineConfig
from orchestrator.config import ServeConfig
from orchestrator.deployment import Deployment
from orchestrator.security import client_channel, hash_key
from tests.e2e.helpers import TINY, request, tokens_of
from tests.tls_certs import make_certificates
from tidal.v1 import admin_pb2, admin_pb2_grpc, generation_pb2_grpc

DATA_KEY, OTHER_DATA_KEY, ADMIN_KEY = "data-key-1", "data-key-2", "admin-key-1"


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("security")
    certs = make_certificates(folder / "certs")
    keys = folder / "api-keys"
    keys.write_text(f"# data-plane keys\n{DATA_KEY}\n\n{OTHER_DATA_KEY}\n")
    audit = folder / "audit.jsonl"
    security = dict(api_key_file=str(keys), admin_key_hashes=(hash_key(ADMIN_KEY),), tls_cert=str(certs["server"]),
                    tls_key=str(certs["server_key"]), tls_client_ca=str(certs["ca"]), audit_log=str(audit))
    cfg = ServeConfig(engine=EngineConfig(**TINY), instances=2, host="127.0.0.1", port=0, http_port=0,
                      deployment="e2e-sec",
                      namespace="tidal-tests", grace_period_s=2.0, rebalance=dict(auto=False), security=security)
    d = Deployment(cfg)
    port = d.start()
    try:
        yield dict(addr=f"127.0.0.1:{port}", http=f"https://127.0.0.1:{d.http_port}", certs=certs, audit=audit)
    finally:
        d.stop()


def channel(server, api_key=None, client_cert=True):
    certs = server["certs"]
    return client_channel(server["addr"], api_key, ca=str(certs["ca"]),
                          cert=str(certs["client"]) if client_cert else None,
                          key=str(certs["client_key"]) if client_cert else None)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def generate(ch, **fields):
    return list(generation_pb2_grpc.GenerationServiceStub(ch).Generate(request(**fields), timeout=30))


def list_instances(ch):
    return admin_pb2_grpc.AdminServiceStub(ch).ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)


def test_each_plane_wants_its_key_and_health_stays_open(server):
    with channel(server) as ch:
        assert code_of(lambda: generate(ch, prompt="hi")) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: list_instances(ch)) == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with channel(server, "not-a-key") as ch:
        assert code_of(lambda: generate(ch, prompt="hi")) == grpc.StatusCode.UNAUTHENTICATED
    with channel(server, DATA_KEY) as ch:
        chunks = generate(ch, prompt="hello there", max_tokens=8, ignore_eos=True)
        assert len(tokens_of(chunks)) == 8 and chunks[-1].finish_reason
        with pytest.raises(grpc.RpcError) as err:
            list_instances(ch)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "admin key" in err.value.details()
    with channel(server, OTHER_DATA_KEY) as ch:
        assert len(tokens_of(generate(ch, prompt="again", max_tokens=4, ignore_eos=True))) == 4
    with channel(server, ADMIN_KEY) as ch:
        assert len(list_instances(ch).instances) == 2
        assert len(tokens_of(generate(ch, prompt="admin", max_tokens=4, ignore_eos=True))) == 4


def test_a_plaintext_client_and_a_client_without_a_certificate_are_refused(server):
    with grpc.insecure_channel(server["addr"]) as ch:
        assert code_of(lambda: list_instances(ch)) == grpc.StatusCode.UNAVAILABLE
    with channel(server, ADMIN_KEY, client_cert=False) as ch:
        assert code_of(lambda: list_instances(ch)) == grpc.StatusCode.UNAVAILABLE


def audit_lines(server) -> list[dict]:
    path = server["audit"]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_admin_operations_are_audited_with_who_what_and_the_result(server):
    before = len(audit_lines(server))
    with channel(server, ADMIN_KEY) as ch:
        admin = admin_pb2_grpc.AdminServiceStub(ch)
        admin.DrainInstance(admin_pb2.DrainInstanceRequest(instance_id="instance-1"), timeout=60)
        admin.UndrainInstance(admin_pb2.UndrainInstanceRequest(instance_id="instance-1"), timeout=30)
        with pytest.raises(grpc.RpcError):
            admin.MigrateRequest(admin_pb2.MigrateRequestRequest(request_id="nobody"), timeout=30)
    with channel(server, DATA_KEY) as ch:
        assert code_of(lambda: admin_pb2_grpc.AdminServiceStub(ch).DrainInstance(
            admin_pb2.DrainInstanceRequest(instance_id="instance-0"), timeout=30)) == grpc.StatusCode.PERMISSION_DENIED
    lines = audit_lines(server)[before:]
    ops = [(line["op"], line["result"]) for line in lines]
    assert ops == [("DrainInstance", "OK"), ("UndrainInstance", "OK"), ("MigrateRequest", "NOT_FOUND"),
                   ("DrainInstance", "PERMISSION_DENIED")]
    assert lines[0]["who"] == f"key:{hash_key(ADMIN_KEY)[:8]}" and 'instance_id: "instance-1"' in lines[0]["args"]
    assert lines[3]["who"] == f"key:{hash_key(DATA_KEY)[:8]}"
    assert all(line["peer"].startswith("ipv4:127.0.0.1") and line["ts"] <= time.time() for line in lines)
    assert not any(ADMIN_KEY in json.dumps(line) or DATA_KEY in json.dumps(line) for line in lines)


def test_the_cli_connects_with_a_key_and_mutual_tls(server):
    certs = server["certs"]
    tls = ["--addr", server["addr"], "--tls-ca", str(certs["ca"]), "--tls-cert", str(certs["client"]),
           "--tls-key", str(certs["client_key"])]
    ok = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", "--json", *tls, "--api-key", ADMIN_KEY],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert {i["instanceId"] for i in json.loads(ok.stdout)["instances"]} == {"instance-0", "instance-1"}
    denied = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", *tls, "--api-key", DATA_KEY],
                            capture_output=True, text=True, timeout=60)
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr
    gen = subprocess.run([sys.executable, "-m", "orchestrator.cli", "generate", "hello", "--max-tokens", "4", *tls],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TIDAL_API_KEY": DATA_KEY})
    assert gen.returncode == 0, gen.stderr


def https(server, client_cert=True):
    certs = server["certs"]
    cert = (str(certs["client"]), str(certs["client_key"])) if client_cert else None
    return httpx.Client(base_url=server["http"], verify=ssl.create_default_context(cafile=str(certs["ca"])),
                        cert=cert, timeout=30)


def test_the_openai_api_wants_a_key_over_mutual_tls_and_its_probes_stay_open(server):
    with https(server) as c:
        for path in ("/health", "/live", "/version", "/metrics"):
            assert c.get(path).status_code == 200, path
        body = {"model": "tiny-llama", "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
        missing = c.post("/v1/completions", json=body)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["type"] == "authentication_error"
        assert c.post("/v1/completions", json=body, headers={"authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        ok = c.post("/v1/completions", json=body, headers={"authorization": f"Bearer {DATA_KEY}"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
        client = openai.OpenAI(base_url=server["http"] + "/v1", api_key=DATA_KEY, http_client=c)
        chunks = list(client.completions.create(model="tiny-llama", prompt="hi", max_tokens=3, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert sum(len(ch.choices[0].text) > 0 for ch in chunks if ch.choices) >= 1
    with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError)):   # no client certificate: refused
        with https(server, client_cert=False) as c:
            c.get("/health")
    with pytest.raises(httpx.RemoteProtocolError):    # plaintext HTTP to the TLS port
        httpx.get(server["http"].replace("https", "http") + "/health", timeout=10)
