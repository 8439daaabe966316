"""`tidal serve` with the real default model in a subprocess, driven by `tidal generate` and `tidal status`."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIDAL = str(Path(sys.executable).parent / "tidal")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # --port 0: the server binds a free port itself and prints it (picking one here and passing it raced
    # with other processes binding ports in between)
    log_path = tmp_path_factory.mktemp("serve") / "tidal-serve.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [TIDAL, "serve", "--model", "smollm2-135m", "--instances", "1", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
         "--kv-cache-gib", "0.25", "--deployment", "smoke"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "tidal: ready" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tidal serve did not become ready:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    port = int(re.search(r"tidal: listening on 127\.0\.0\.1:(\d+)", log_path.read_text()).group(1))
    assert port > 0
    yield proc, f"127.0.0.1:{port}", log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def run(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([TIDAL, *args], capture_output=True, text=True, timeout=timeout)


def test_generate_prints_the_answer_and_status_shows_the_instance(server):
    proc, addr, _ = server
    out = run("generate", "The capital of France is", "--max-tokens", "8", "--addr", addr)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    status = run("status", "--addr", addr)
    assert status.returncode == 0, status.stderr
    assert "instance-0" in status.stdout and "serving" in status.stdout


def test_serve_prints_its_http_port_and_the_openai_api_answers_there(server):
    import json
    import urllib.request

    _, _, log = server
    log.flush()
    found = re.search(r"tidal: HTTP on 127\.0\.0\.1:(\d+)", Path(log.name).read_text())
    assert found, Path(log.name).read_text()[-2000:]
    base = f"http://127.0.0.1:{found.group(1)}"
    with urllib.request.urlopen(f"{base}/v1/models", timeout=30) as r:
        assert [m["id"] for m in json.load(r)["data"]] == ["smollm2-135m"]
    body = json.dumps({"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8,
                       "temperature": 0}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        answer = json.load(r)
    assert 1 <= answer["usage"]["completion_tokens"] <= 8 and "Paris" in answer["choices"][0]["text"], answer


def test_sigint_stops_the_server_gracefully(server):
    proc, addr, log = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    assert "tidal: stopped" in Path(log.name).read_text()
    out = run("status", "--addr", addr)
    assert out.returncode == 1 and "no server" in out.stderr
