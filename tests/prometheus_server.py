"""A real Prometheus server for tests: its own port, data directory and process, stopped by its own PID."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from tests.redis_server import free_port


class PrometheusServer:
    """`with PrometheusServer(tmp_dir, ["127.0.0.1:8000"]) as prom:` scrapes those targets every `interval_s`."""

    def __init__(self, tmp_dir, targets: list[str], interval_s: float = 1.0, start_timeout_s: float = 30.0):
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            raise RuntimeError("prometheus is not installed; the metrics tests need a real one: "
                               "apt-get install -y --no-install-recommends prometheus (or `make prometheus`)")
        self.dir = Path(tmp_dir)
        self.targets, self.interval_s, self.start_timeout_s = targets, interval_s, start_timeout_s
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.dir / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": f"{self.interval_s:g}s", "evaluation_interval": f"{self.interval_s:g}s"},
            "scrape_configs": [{"job_name": "tidal", "honor_labels": True,
                                "static_configs": [{"targets": self.targets}]}]}))
        args = [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        log = self.dir / "prometheus.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus on port {self.port} was not ready within {self.start_timeout_s} s; "
                                   f"its log ({log}):\n{log.read_text()[-2000:]}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> list:
        """The instant vector (or scalar) `expr` gives now; AssertionError with Prometheus' message if invalid."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"PromQL {expr!r} refused: {e.read().decode()[:500]}") from None
        assert body["status"] == "success", body
        result = body["data"]["result"]
        return result if body["data"]["resultType"] == "vector" else [result]

    def targets_up(self) -> list[dict]:
        with urllib.request.urlopen(f"{self.url}/api/v1/targets", timeout=10) as r:
            return json.load(r)["data"]["activeTargets"]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> PrometheusServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
