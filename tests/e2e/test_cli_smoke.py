"""`tidal serve` with the real default model in a subprocess, driven by `tidal generate` and `tidal status`."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIDAL = str(Path(sys.executable).parent / "tidal")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tidal-serve-{port}.log", "w+")
    proc = subprocess.Popen(
        [TIDAL, "serve", "--model", "smollm2-135m", "--instances", "1", "--host", "127.0.0.1", "--port", str(port),
         "--kv-cache-gib", "0.25", "--deployment", "smoke"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while "tidal: ready" not in Path(log.name).read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"tidal serve did not become ready:\n{Path(log.name).read_text()[-3000:]}")
        time.sleep(0.5)
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


def test_sigint_stops_the_server_gracefully(server):
    proc, addr, log = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0
    assert "tidal: stopped" in Path(log.name).read_text()
    out = run("status", "--addr", addr)
    assert out.returncode == 1 and "no server" in out.stderr
