"""Autoscaling: what it saves against fixed provisioning at peak, what it costs in tail latency, and what
scale-in loses when it aborts instead of draining by migration.

    python -m benchmarks.autoscale [--shape day|burstgpt] [--day-s 3600] [--peak-rate 6] [--max-instances 48]
                                   [--seed 0] [--real]

Simulator (orchestrator/sim/): one simulated "day" of `--day-s` seconds whose arrival rate follows a day shape
(peak `--peak-rate` req/s at mid-day, a tenth of it at night: a Poisson process thinned to the curve) or
BurstGPT's own timestamps squeezed into the day; lengths from the Azure conversation trace scaled so their
99th percentiles are 768 prompt / 128 output tokens (`../shared/data`, see each SOURCE.md). Three runs:
- fixed: as many instances as the autoscaled run needed at its peak, all day;
- auto (drain): Tidal's autoscaler (`orchestrator/policies/autoscale.py`; its default settings, or `--low`,
  `--high`, `--up-delay`, `--down-delay`) with scale-in by drain-by-migration;
- auto (abort): the same policy, but scale-in takes the newest instance (as a ReplicaSet scales down), stops
  sending it requests and aborts whatever is left after a 5 s grace period (what peers do: Dynamo aborts
  in-flight work 5 s after SIGTERM).
A new instance serves `--start-s` (30) after the decision and is paid for from the decision on.

`--real`: a short burst on real tiny-llama instances (local Ray), autoscale 1 -> 3 -> 1 with short delays:
requests that failed (must be 0) and the seconds from each scale-out decision to the new instance serving.

Last line: cost_saving_pct=<vs fixed> p99_ttft_ratio_fixed_over_auto=<fixed / auto (drain)> aborted=<auto (drain)>
Goals (issue 14): >= 25 % saving, P99 TTFT within 1.2x of fixed (ratio >= 0.83), 0 aborted.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import replace

from orchestrator.bench.traces import load_trace, scale_lengths
from orchestrator.bench.stats import percentile
from orchestrator.policies.autoscale import AutoscaleConfig
from orchestrator.sim.cluster import SimConfig, SimRequest, SimResult, simulate
from orchestrator.sim.cost_model import StepCostModel

TRACE = "azure-conv"
MAX_PROMPT, MAX_OUTPUT = 768, 128
NIGHT = 0.1                    # the night's rate, as a share of the peak
ABORT_GRACE_S = 5.0            # the peers' scale-in: Dynamo aborts in-flight work 5 s after SIGTERM


def day_arrivals(day_s: float, peak: float, rng: random.Random) -> list[float]:
    """A Poisson process at `peak`, thinned to peak x (NIGHT + (1 - NIGHT)(1 - cos(2 pi t / day)) / 2)."""
    times, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= day_s:
            return times
        if rng.random() < NIGHT + (1 - NIGHT) * (1 - math.cos(2 * math.pi * t / day_s)) / 2:
            times.append(t)


def burstgpt_arrivals(day_s: float, peak: float, rng: random.Random) -> list[float]:
    """BurstGPT's timestamps, the first `day_s x peak / 2` of them squeezed into `day_s`."""
    rows = load_trace("burstgpt", limit=int(day_s * peak / 2))
    span = rows[-1].arrival_s or 1.0
    return [r.arrival_s * day_s / span for r in rows]


def workload(shape: str, day_s: float, peak: float, seed: int) -> list[SimRequest]:
    rng = random.Random(f"{seed}-arrivals")
    times = day_arrivals(day_s, peak, rng) if shape == "day" else burstgpt_arrivals(day_s, peak, rng)
    lengths = scale_lengths(load_trace(TRACE), MAX_PROMPT, MAX_OUTPUT)
    rows = random.Random(f"{seed}-lengths").choices(lengths, k=len(times))      # a long day outlasts the trace
    return [SimRequest(t, r.prompt_tokens, r.output_tokens) for t, r in zip(times, rows)]


def summary(name: str, r: SimResult) -> dict:
    ttft = [x.ttft_s for x in r.finished]
    return {"name": name, "instance_h": r.instance_s / 3600, "p50": percentile(ttft, 50), "p99": percentile(ttft, 99),
            "aborted": r.aborted, "max": r.max_instances, "finished": len(r.finished), "migrations": r.migrations,
            "wall_s": r.wall_s}


def simulated(args) -> list[dict]:
    wl = workload(args.shape, args.day_s, args.peak_rate, args.seed)
    cost = StepCostModel.load()
    base = SimConfig(num_instances=1, num_blocks=64, max_model_len=1024, seed=args.seed)
    policy = AutoscaleConfig(enabled=True, max_instances=args.max_instances, low_freeness=args.low,
                             high_freeness=args.high, scale_up_delay_s=args.up_delay, scale_down_delay_s=args.down_delay)
    auto = replace(base, autoscale=policy, instance_start_s=args.start_s)
    print(f"{len(wl)} requests over a {args.day_s:.0f} s {args.shape} (peak {args.peak_rate} req/s); "
          f"{base.num_blocks} blocks x 16 tokens per instance; new instances serve {args.start_s:.0f} s after the "
          f"decision", flush=True)
    drained = simulate(wl, auto, cost)
    aborting = simulate(wl, replace(auto, scale_in="abort", abort_grace_s=ABORT_GRACE_S, scale_in_victim="newest"),
                        cost)
    fixed = simulate(wl, replace(base, num_instances=drained.max_instances), cost)
    return [summary(f"fixed ({drained.max_instances})", fixed), summary("auto (drain)", drained),
            summary("auto (abort)", aborting)]


def real() -> tuple[int, list[float]]:
    """A burst on real tiny-llama instances: failed requests, and decision -> serving seconds per scale-out."""
    import logging
    import os
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import ray

    from tests.e2e.helpers import deployment
    from tidal.v1 import admin_pb2

    ray.init(num_cpus=max(8, os.cpu_count() or 1), namespace="tidal-bench", include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=False)
    autoscale = dict(enabled=True, low_freeness=10, high_freeness=40, scale_up_delay_s=1, scale_down_delay_s=2,
                     cooldown_s=1, interval_s=0.2, max_instances=3)
    failed, starts, stop = [0], [], threading.Event()
    try:
        with deployment("bench-autoscale", instances=1, engine=dict(num_blocks=128, max_num_seqs=16),
                        autoscale=autoscale, rebalance=dict(auto=True, interval_s=0.2)) as c:
            def watch():
                adding = {}
                while not stop.wait(0.05):
                    resp = c.admin.ListInstances(admin_pb2.ListInstancesRequest(), timeout=10)
                    if resp.control_plane.scaling.startswith("adding "):
                        for iid in resp.control_plane.scaling.removeprefix("adding ").split(", "):
                            adding.setdefault(iid, time.monotonic() - resp.control_plane.last_scale_age_s)
                    for inst in resp.instances:
                        if inst.instance_id in adding and inst.state == admin_pb2.INSTANCE_STATE_SERVING:
                            starts.append(time.monotonic() - adding.pop(inst.instance_id))

            def client(w, until):
                k = 0
                while time.monotonic() < until:
                    try:
                        c.generate(timeout=300, prompt=f"bench {w}-{k}", max_tokens=300, ignore_eos=True)
                    except grpc.RpcError:
                        failed[0] += 1
                    k += 1

            watcher = threading.Thread(target=watch)
            watcher.start()
            end = time.monotonic() + 30
            with ThreadPoolExecutor(24) as pool:
                list(pool.map(lambda w: client(w, end), range(24)))
            deadline = time.monotonic() + 120
            while len(c.instances()) > 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            stop.set()
            watcher.join()
    finally:
        ray.shutdown()
    return failed[0], starts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["day", "burstgpt"], default="day")
    parser.add_argument("--day-s", type=float, default=3600.0, help="simulated seconds of the day")
    parser.add_argument("--peak-rate", type=float, default=6.0, help="requests per second at the peak")
    parser.add_argument("--max-instances", type=int, default=48)
    parser.add_argument("--start-s", type=float, default=30.0, help="decision -> a new instance serves")
    defaults = AutoscaleConfig()
    parser.add_argument("--low", type=float, default=defaults.low_freeness, help="autoscale.low_freeness")
    parser.add_argument("--high", type=float, default=defaults.high_freeness, help="autoscale.high_freeness")
    parser.add_argument("--up-delay", type=float, default=defaults.scale_up_delay_s)
    parser.add_argument("--down-delay", type=float, default=defaults.scale_down_delay_s)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="also a short burst on real tiny-llama instances")
    args = parser.parse_args(argv)
    rows = simulated(args)
    print(f"\n{'run':>14} {'inst-h':>7} {'max':>4} {'TTFT p50 s':>10} {'TTFT p99 s':>10} {'aborted':>7} "
          f"{'done':>6} {'migr':>5} {'wall s':>6}")
    for r in rows:
        print(f"{r['name']:>14} {r['instance_h']:7.2f} {r['max']:4d} {r['p50']:10.2f} {r['p99']:10.2f} "
              f"{r['aborted']:7d} {r['finished']:6d} {r['migrations']:5d} {r['wall_s']:6.1f}")
    fixed, drained, aborting = rows
    if args.real:
        failed, starts = real()
        print(f"\nreal (tiny-llama, 1 -> 3 -> 1): {failed} failed requests; decision -> serving "
              f"{', '.join(f'{s:.1f}' for s in starts) or '-'} s")
    print(f"\ngoals: cost_saving_pct >= 25, p99_ttft_ratio_fixed_over_auto >= 0.83, aborted = 0 "
          f"(abort-on-scale-in aborts {aborting['aborted']})")
    print(f"cost_saving_pct={100 * (1 - drained['instance_h'] / fixed['instance_h']):.1f} "
          f"p99_ttft_ratio_fixed_over_auto={fixed['p99'] / drained['p99']:.2f} aborted={drained['aborted']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
