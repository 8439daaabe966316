"""Elastic expert parallelism under load: scale a live MoE instance's EP size while streams decode, against a
restart at the new size.

    python -m benchmarks.moe_scaling [--model tiny-moe|smollm2-135m-moe] [--sizes 2,4] [--streams 6]
                                     [--max-tokens 96] [--phase-s 4] [--no-check] [--no-restart]

Tidal: one instance (local Ray) serving `--model`, `--streams` clients each sending one greedy stream after
another; `--phase-s` seconds of steady load, then `tidal scale INSTANCE --ep N` for each size of `--sizes`
(each followed by `--phase-s` more). Warm workers are kept for every size asked (the pool of pre-started
empty workers), each worker asks Ray for 0.1 CPU. Per-layer traffic goes over Ray actor calls.

Restart baseline: what changing the EP size costs without live scaling: stop the instance and start one at
the new size from the weights. Measured as the start of a fresh instance actor at EP N (loading the model,
starting N-1 workers with no warm pool, placing the experts) until it serves; the stop, and re-prefilling the
requests the restart dropped, are not counted (both favour the baseline). With one instance, every stream in
flight is lost (or, with a peer, recomputed elsewhere after a migration or failover).

Figures: scale-up latency (command -> switched, as the client sees it) for both; downtime = the largest
inter-token gap of a running stream in a window around each scale, minus the steady p99 gap; tokens/s
before / during (the scale's window +-1 s) / after; dropped streams; peak RSS of the instance and its
workers; output identity against a run that never scaled (greedy, in-process engine; `--no-check` skips it).

Last line: scaleup_latency_ratio_restart_over_tidal=<restart / tidal, first scale-up> max_gap_ms=<largest gap
during any scale> dropped=<streams that failed>
Goals (issue 12): ratio >= 10, gap <= one decode step over the steady p99, dropped = 0, identical output.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import sys
import threading
import time

import grpc

from orchestrator.bench.report import format_table
from orchestrator.bench.stats import percentile

log = logging.getLogger(__name__)


def prompt_ids(rng: random.Random, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(rng.randint(8, 48))]


class Client(threading.Thread):
    """Greedy streams one after another until `stop`; records each stream's chunk arrival times."""

    def __init__(self, stub, seed: int, max_tokens: int, vocab: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.stub, self.rng, self.max_tokens, self.vocab, self.stop = stub, random.Random(seed), max_tokens, vocab, stop
        self.done: list[tuple[list[int], list[float], list[int]]] = []
        self.failed: list[str] = []

    def run(self) -> None:
        from tests.e2e.helpers import request

        while not self.stop.is_set():
            ids = prompt_ids(self.rng, self.vocab)
            times, tokens = [], []
            try:
                for ch in self.stub.Generate(request(token_ids=ids, max_tokens=self.max_tokens, ignore_eos=True),
                                             timeout=300):
                    times.append(time.monotonic())
                    tokens += list(ch.token_ids)
            except grpc.RpcError as e:
                self.failed.append(f"{e.code().name}: {e.details()}")
                continue
            self.done.append((ids, times, tokens))


class RssSampler(threading.Thread):
    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.samples, self.stop = pids, [], threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.wait(0.1):
            total = 0
            for pid in self.pids():
                try:
                    total += psutil.Process(pid).memory_info().rss
                except (psutil.Error, ValueError):
                    pass
            self.samples.append((time.monotonic(), total))

    def peak(self, lo: float, hi: float) -> int:
        return max((r for t, r in self.samples if lo <= t <= hi), default=0)


def restart_latency(engine: dict, size: int) -> float:
    """Seconds to start a fresh instance at EP `size` (the restart baseline's start half)."""
    from rpc import Deadlines
    from rpc.instance import InstanceClient

    cfg = {**engine, "ep": {**engine["ep"], "size": size, "warm_workers": 0}}
    started = time.monotonic()
    client = InstanceClient.create(f"restart-ep{size}", cfg, {}, Deadlines(), num_cpus=1.0)
    try:
        client.start().result()
        return time.monotonic() - started
    finally:
        try:
            client.stop().result()
        except Exception:  # noqa: BLE001
            pass
        client.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--sizes", default="2,4", help="EP sizes to scale to, in order")
    p.add_argument("--streams", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--phase-s", type=float, default=4.0)
    p.add_argument("--no-check", action="store_true", help="skip the output-identity check")
    p.add_argument("--no-restart", action="store_true", help="skip the restart baseline")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray

    from orchestrator.config import ServeConfig
    from orchestrator.deployment import Deployment
    from instance.config import EngineConfig
    from tidal.v1 import admin_pb2, admin_pb2_grpc, generation_pb2_grpc

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (root, os.path.join(root, "proto"),
                                                            os.environ.get("PYTHONPATH")) if x)
    ray.init(num_cpus=8, namespace="bench-moe", include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    engine = dict(model=args.model, num_blocks=1024, block_size=16, max_model_len=1024, max_num_seqs=32,
                  ep=dict(max_size=max(sizes), warm_workers=max(sizes) - 1, worker_num_cpus=0.1))
    cfg = ServeConfig(engine=EngineConfig(**engine), instances=1, host="127.0.0.1", port=0,
                      deployment="bench-moe", namespace="bench-moe", grace_period_s=2.0)
    d = Deployment(cfg)
    port = d.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    admin, gen = admin_pb2_grpc.AdminServiceStub(channel), generation_pb2_grpc.GenerationServiceStub(channel)

    def instance():
        return admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10).instances[0]

    inst = instance()
    iid, vocab = inst.instance_id, 256 if args.model.startswith("tiny") else 49152
    deadline = time.monotonic() + 120
    while instance().experts.warm_workers < max(sizes) - 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    sampler = RssSampler(lambda: [r.pid for r in instance().experts.ranks] + list(instance().experts.warm_pids))
    sampler.start()
    stop = threading.Event()
    clients = [Client(gen, k, args.max_tokens, vocab, stop) for k in range(args.streams)]
    began = time.monotonic()
    for c in clients:
        c.start()
    time.sleep(args.phase_s)
    scales, step_ms = [], [("EP 1", instance().load.step_time_ms, 0.0)]
    for n in sizes:
        t0 = time.monotonic()
        r = admin.ScaleExperts(admin_pb2.ScaleExpertsRequest(instance_id=iid, ep_size=n), timeout=300)
        t1 = time.monotonic()
        scales.append((n, t0, t1, r))
        print(f"EP {r.previous} -> {r.ep_size}: {r.result} in {1000 * (t1 - t0):.0f} ms (copy {r.transfer_ms:.0f} ms, "
              f"switch {r.switch_ms:.1f} ms, {len(r.moves)} experts, {r.bytes_moved / 1e6:.1f} MB)", flush=True)
        time.sleep(args.phase_s)
        x = instance()
        step_ms.append((f"EP {n}", x.load.step_time_ms, x.experts.remote_ms_per_layer))
    stop.set()
    for c in clients:
        c.join(timeout=360)
    ended = time.monotonic()
    sampler.stop.set()
    status = instance()

    done = [s for c in clients for s in c.done]
    failed = [f for c in clients for f in c.failed]
    gaps = [(b, b - a) for _, times, _ in done for a, b in zip(times[1:], times[2:])]
    first_t0, last_t1 = scales[0][1], scales[-1][2]
    steady = [g for t, g in gaps if t < first_t0]
    p99 = percentile(steady, 99) if steady else 0.0
    windows = [(t0 - 0.2, t1 + 0.5) for _, t0, t1, _ in scales]
    during = [g for t, g in gaps if any(lo <= t <= hi for lo, hi in windows)]
    max_gap = max(during, default=0.0)
    token_times = [t for _, times, _ in done for t in times]

    def rate(lo: float, hi: float) -> float:
        return sum(1 for t in token_times if lo <= t < hi) / max(hi - lo, 1e-9)

    rows = [("PHASE", "TOKENS/S", "STEP MS", "REMOTE MS/LAYER", "PEAK RSS MB")]
    rows.append(("before", f"{rate(began + 1, first_t0):.0f}", f"{step_ms[0][1]:.1f}", "-",
                 f"{sampler.peak(began, first_t0) / 1e6:.0f}"))
    for (n, t0, t1, r), (_, ms, remote) in zip(scales, step_ms[1:]):
        rows.append((f"during EP->{n}", f"{rate(t0 - 1, t1 + 1):.0f}", "-", "-",
                     f"{sampler.peak(t0 - 0.2, t1 + 0.5) / 1e6:.0f}"))
        rows.append((f"after EP {n}", f"{rate(t1 + 1, t1 + args.phase_s):.0f}", f"{ms:.1f}", f"{remote:.2f}",
                     f"{sampler.peak(t1, t1 + args.phase_s) / 1e6:.0f}"))
    print(format_table(rows, right_align=False))

    identical = "not checked"
    if not args.no_check:
        from instance.engine import Engine
        from instance.sampling import SamplingParams

        ref = Engine(**{k: v for k, v in engine.items() if k != "ep"})
        want = ref.generate([ids for ids, _, _ in done],
                            SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True))
        same = sum(1 for (_, _, toks), w in zip(done, want) if toks == w.new_token_ids)
        identical = f"{same}/{len(done)} streams identical to an unscaled run"

    restart = {}
    if not args.no_restart:
        for n in sizes:
            restart[n] = restart_latency(engine, n)
    channel.close()
    d.stop()

    tidal_first = scales[0][2] - scales[0][1]
    print(f"\nmodel {args.model}, {args.streams} streams of {args.max_tokens} tokens, {len(done)} streams finished, "
          f"{len(failed)} failed; steady p99 inter-token gap {1000 * p99:.1f} ms; output: {identical}")
    for n, t0, t1, r in scales:
        line = f"EP {r.previous} -> {n}: tidal {1000 * (t1 - t0):.0f} ms"
        if n in restart:
            line += f", restart {1000 * restart[n]:.0f} ms (ratio {restart[n] / (t1 - t0):.1f}, downtime = the " \
                    f"restart, {args.streams} streams in flight lost)"
        print(line)
    print(f"max inter-token gap during scaling {1000 * max_gap:.1f} ms = steady p99 + {1000 * (max_gap - p99):.1f} ms; "
          f"load 1/5/15 min {os.getloadavg()[0]:.1f}/{os.getloadavg()[1]:.1f}/{os.getloadavg()[2]:.1f} on "
          f"{os.cpu_count()} cores (shared machine); EP {status.experts.ep_size} at the end")
    ratio = restart[sizes[0]] / tidal_first if restart else float("nan")
    print(f"scaleup_latency_ratio_restart_over_tidal={ratio:.1f} max_gap_ms={1000 * max_gap:.1f} dropped={len(failed)}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
