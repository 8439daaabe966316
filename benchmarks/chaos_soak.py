"""Chaos soak: N streams without faults, then the same N while instances, the scheduler and the state store
(redis-server) are SIGKILLed at random every few seconds; the two passes are compared token by token.

    python -m benchmarks.chaos_soak [--n 4000] [--interval 1.5] [--concurrency 32] [--max-tokens 48]
                                    [--instances 3] [--faults instance,scheduler,redis] [--seed 0]

tiny-llama on `--instances` instances with `--restart-dead-instances`, a Redis state store (a redis-server of
its own on a free port), half the streams greedy and half seeded, EOS ignored. Every `--interval` seconds one
fault of a kind drawn from `--faults`: SIGKILL of a serving instance's worker process, SIGKILL of the
scheduler's process (Ray restarts it), or SIGKILL of redis-server (restarted 2 s later). Each chaos stream ends
as one of:
- identical: the fault-free pass's tokens (or, where batching flipped a near-tie draw in that pass, the
  in-process reference's), with contiguous seq;
- near_tie: different from a token on whose draw the reference had a margin under NEAR_TIE (the engine is
  not batch-invariant; a stream resumed by re-prefill can flip such a draw — see tests/e2e/helpers.py);
- different: any other difference, or a broken seq (a bug);
- error: a clear gRPC status with a message;
- hung: no answer before the client's deadline.
Then: how long after the last fault every instance serves again and the scheduler answers.
Last line: identical_pct=<%> different=<n> hung=<n> recovered_s=<s>
Goals (issue 17): different = 0, hung = 0, identical >= 95 %, recovered within 30 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import ray
import torch

from instance.config import EngineConfig
from instance.engine import Engine
from instance.sampling import SamplingParams
from orchestrator.config import ServeConfig
from orchestrator.deployment import Deployment
from rpc import Deadlines, RemoteError
from rpc.scheduler import SchedulerClient
from tests.e2e.helpers import NEAR_TIE, TINY, reference_with_margins, request, tokens_of
from tests.redis_server import RedisServer
from tidal.v1 import admin_pb2, admin_pb2_grpc, generation_pb2_grpc

FAULTS = ("instance", "scheduler", "redis")
REDIS_DOWN_S = 2.0             # a killed redis-server comes back after this
STREAM_DEADLINE_S = 180.0      # the client's deadline: a stream without an answer by then is "hung"
RECOVERY_TIMEOUT_S = 120.0
PROBE = Deadlines(call_s=2.0)  # the killer's calls on a scheduler that may be restarting


@dataclass(frozen=True)
class Case:
    request_id: str
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None

    def fields(self, suffix: str) -> dict:
        f = dict(prompt=self.prompt, max_tokens=self.max_tokens, ignore_eos=True, request_id=self.request_id + suffix)
        if self.seed is not None:
            f.update(temperature=self.temperature, top_p=0.95, seed=self.seed)
        return f

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=0.95 if self.seed
                              is not None else 1.0, seed=self.seed, ignore_eos=True)


@dataclass
class Stream:
    tokens: list[int] | None = None
    seq_ok: bool = True
    code: str = ""
    message: str = ""


@dataclass
class SoakReport:
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)          # "CODE: message prefix" -> count
    kills: Counter = field(default_factory=Counter)
    recovered_s: float = float("nan")
    fault_free_errors: int = 0
    chaos_s: float = 0.0
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def identical_pct(self) -> float:
        return 100.0 * self.outcomes["identical"] / max(1, self.total)


def make_cases(n: int, max_tokens: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        prompt = f"soak {i} " + "tide " * rng.randint(0, 40)
        if i % 2:
            cases.append(Case(f"soak-{i}", prompt, max_tokens, temperature=0.8, seed=rng.randrange(1 << 30)))
        else:
            cases.append(Case(f"soak-{i}", prompt, max_tokens))
    return cases


def run_pass(stub, cases: list[Case], suffix: str, concurrency: int) -> dict[str, Stream]:
    def one(case: Case) -> tuple[str, Stream]:
        out = Stream()
        try:
            chunks = list(stub.Generate(request(**case.fields(suffix)), timeout=STREAM_DEADLINE_S))
            out.tokens = tokens_of(chunks)
            out.seq_ok = [c.seq for c in chunks] == list(range(len(chunks)))
        except grpc.RpcError as e:
            out.code, out.message = e.code().name, e.details() or ""
        return case.request_id, out

    with ThreadPoolExecutor(concurrency) as pool:
        return dict(pool.map(one, cases))


class Killer(threading.Thread):
    """Every `interval` seconds, one fault of a kind drawn from `faults`."""

    def __init__(self, deployment: Deployment, redis: RedisServer, faults: list[str], interval: float, seed: int):
        super().__init__(daemon=True)
        self.scheduler = SchedulerClient(deployment.scheduler.actor, PROBE)
        self.redis, self.faults, self.interval = redis, faults, interval
        self.rng = random.Random(f"{seed}-faults")
        self.kills: Counter = Counter()
        self.last_fault = 0.0
        self.stopping = threading.Event()
        self._views: list = []
        self._redis_lock = threading.Lock()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            kind = self.rng.choice(self.faults)
            if getattr(self, f"_kill_{kind}")():
                self.kills[kind] += 1
                self.last_fault = time.monotonic()

    def _kill_instance(self) -> bool:
        try:
            self._views = self.scheduler.list_instances().result()
        except RemoteError:
            pass                                  # the scheduler is restarting: kill from the last table seen
        serving = [v for v in self._views if v.state == "serving" and v.info is not None]
        if len(serving) < 1:
            return False
        return _sigkill(self.rng.choice(serving).info.pid)

    def _kill_scheduler(self) -> bool:
        try:
            return _sigkill(self.scheduler.pid().result())
        except RemoteError:
            return False                          # already down and restarting

    def _kill_redis(self) -> bool:
        with self._redis_lock:
            if self.redis.proc is None:
                return False
            self.redis.kill()
        threading.Timer(REDIS_DOWN_S, self._restart_redis).start()
        return True

    def _restart_redis(self) -> None:
        with self._redis_lock:
            if self.redis.proc is None:
                self.redis.start()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        time.sleep(REDIS_DOWN_S + 0.5)
        self._restart_redis()


def _sigkill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def wait_recovered(stub: admin_pb2_grpc.AdminServiceStub, instances: int, since: float) -> float:
    """Seconds from `since` until every instance serves and the scheduler answers again."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            resp = stub.ListInstances(admin_pb2.ListInstancesRequest(), timeout=5)
            serving = sum(i.state == admin_pb2.INSTANCE_STATE_SERVING for i in resp.instances)
            cp = resp.control_plane
            if serving == instances and cp.scheduler_reachable and cp.state_store_reachable:
                return time.monotonic() - since
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    return float("nan")


def classify(case: Case, chaos: Stream, fault_free: Stream, reference: Engine, report: SoakReport) -> None:
    if chaos.tokens is None:
        kind = "hung" if chaos.code == "DEADLINE_EXCEEDED" else "error"
        report.outcomes[kind] += 1
        report.errors[f"{chaos.code}: {chaos.message[:60]}"] += 1
        return
    if not chaos.seq_ok:
        report.outcomes["different"] += 1
        report.examples.append(f"{case.request_id}: seq not contiguous")
        return
    if fault_free.tokens is not None and chaos.tokens == fault_free.tokens:
        report.outcomes["identical"] += 1
        return
    expected, margins = reference_with_margins(reference, case.prompt, case.params())
    if chaos.tokens == expected:
        report.outcomes["identical"] += 1         # the fault-free pass flipped a near-tie, not this one
        return
    first = next((i for i, (a, b) in enumerate(zip(chaos.tokens, expected)) if a != b),
                 min(len(chaos.tokens), len(expected)))
    if len(chaos.tokens) == len(expected) and first < len(margins) and margins[first] < NEAR_TIE:
        report.outcomes["near_tie"] += 1
    else:
        report.outcomes["different"] += 1
        report.examples.append(f"{case.request_id}: first difference at token {first} of {len(expected)}")


def run_soak(n: int, interval: float, concurrency: int, max_tokens: int, instances: int, faults: list[str],
             seed: int = 0, log=print) -> SoakReport:
    """Both passes on a deployment of its own (Ray must be initialized); the report."""
    report = SoakReport()
    cases = make_cases(n, max_tokens, seed)
    with tempfile.TemporaryDirectory(prefix="tidal-soak-") as tmp, RedisServer(tmp) as redis:
        cfg = ServeConfig(engine=EngineConfig(**TINY), instances=instances, host="127.0.0.1", port=0, http_port=0,
                          deployment=f"soak-{seed}", namespace="tidal-soak", restart_dead_instances=True,
                          state_store=redis.url, request_retries=5, grace_period_s=2.0)
        d = Deployment(cfg)
        port = d.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            started = time.monotonic()
            fault_free = run_pass(stub, cases, "", concurrency)
            report.fault_free_errors = sum(s.tokens is None for s in fault_free.values())
            log(f"fault-free pass: {n} streams in {time.monotonic() - started:.1f} s, "
                f"{report.fault_free_errors} errors")
            killer = Killer(d, redis, faults, interval, seed)
            started = time.monotonic()
            killer.start()
            try:
                chaos = run_pass(stub, cases, "-chaos", concurrency)
            finally:
                killer.stop()
            report.chaos_s = time.monotonic() - started
            report.kills = killer.kills
            report.recovered_s = wait_recovered(admin_pb2_grpc.AdminServiceStub(channel), instances,
                                                killer.last_fault or started)
            log(f"chaos pass: {n} streams in {report.chaos_s:.1f} s, kills {dict(killer.kills)}, "
                f"recovered {report.recovered_s:.1f} s after the last fault")
            reference = Engine(**TINY)
            for case in cases:
                classify(case, chaos[case.request_id], fault_free[case.request_id], reference, report)
        finally:
            channel.close()
            d.stop(grace_s=0)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--interval", type=float, default=1.5, help="seconds between two faults")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated, of {', '.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    if not faults or set(faults) - set(FAULTS):
        parser.error(f"--faults: choose from {', '.join(FAULTS)}")
    torch.set_num_threads(1)
    ray.init(num_cpus=max(8, os.cpu_count() or 1), namespace="tidal-soak", include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    try:
        r = run_soak(args.n, args.interval, args.concurrency, args.max_tokens, args.instances, faults, args.seed)
    finally:
        ray.shutdown()
    print(f"\n{'outcome':>10} {'streams':>8}")
    for kind in ("identical", "near_tie", "different", "error", "hung"):
        print(f"{kind:>10} {r.outcomes[kind]:>8}")
    print(f"\nkills: {dict(r.kills)} over {r.chaos_s:.0f} s; fault-free pass errors: {r.fault_free_errors}")
    for what, count in r.errors.most_common(8):
        print(f"  {count:>5} x {what}")
    for line in r.examples[:8]:
        print(f"  different: {line}")
    print(f"identical_pct={r.identical_pct:.1f} different={r.outcomes['different']} hung={r.outcomes['hung']} "
          f"recovered_s={r.recovered_s:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
