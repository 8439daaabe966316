"""What the control plane's pure policies cost as the fleet grows: one freeness dispatch, and one rebalancing
round of `plan_migrations`, on synthetic load snapshots of 16 … 4,000 instances (one thread, no Ray).

    python -m benchmarks.control_plane [--sizes 16 256 1000 4000] [--seed 0]

Each instance has 1,000 KV blocks of 16 tokens and 0–40 running requests with random lengths; a tenth of them
are overloaded (a queue, little free memory), a tenth nearly idle, so a round finds sources and destinations.
Reported per size: dispatch time per request (median of repeats, process CPU time) and planning time per round.
Last line: `dispatch_us_1000=<x> plan_ms_1000=<y>` (goals in issue 20: <= 50 and <= 10).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from instance.backend import LoadSnapshot, RequestInfo
from orchestrator.policies.dispatch import Candidate, choose_instance
from orchestrator.policies.migration import InstanceState, MigrationPolicyConfig, plan_migrations

BLOCKS, BLOCK = 1000, 16


def fleet(n: int, rng: random.Random) -> list[InstanceState]:
    out = []
    for i in range(n):
        kind = rng.random()
        running = rng.randrange(30, 40) if kind < 0.1 else rng.randrange(0, 3) if kind > 0.9 else rng.randrange(5, 30)
        waiting = rng.randrange(1, 6) if kind < 0.1 else 0
        reqs = []
        used = 0
        for r in range(running + waiting):
            tokens = rng.randrange(50, 600)
            status = "running" if r < running else "waiting"
            if status == "running":
                used += -(-tokens // BLOCK)
            reqs.append(RequestInfo(request_id=f"i{i}-r{r}", status=status, num_tokens=tokens,
                                    num_prompt_tokens=tokens // 2, num_output_tokens=tokens - tokens // 2,
                                    max_tokens=512, num_computed_tokens=tokens - 1 if status == "running" else 0,
                                    priority=0, num_preemptions=0))
        used = min(used, BLOCKS)
        waiting_blocks = sum(-(-r.num_tokens // BLOCK) for r in reqs if r.status == "waiting")
        load = LoadSnapshot(total_blocks=BLOCKS, free_blocks=BLOCKS - used, used_blocks=used, reserved_blocks=0,
                            block_size=BLOCK, num_running=running, num_waiting=waiting, num_preempted=0,
                            num_suspended=0,
                            head_demand_blocks=-(-reqs[running].num_tokens // BLOCK) if waiting else 0,
                            waiting_demand_blocks=waiting_blocks, running_tokens=used * BLOCK, step_time_ms=30.0,
                            tokens_per_s=500.0, num_preemptions_total=0)
        out.append(InstanceState(f"instance-{i}", load, tuple(reqs)))
    return out


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def measure(n: int, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    states = fleet(n, rng)
    candidates = [Candidate(s.instance_id, s.load, batch_slots=64) for s in states]
    pick = random.Random(seed)
    dispatches = max(20, 20_000 // n)

    def dispatch_many():
        for t in range(dispatches):
            choose_instance("freeness", candidates, t, pick)

    dispatch_s = _timed(dispatch_many, 5) / dispatches
    cfg = MigrationPolicyConfig()
    plan_s = _timed(lambda: plan_migrations(states, cfg, 1000.0, {}), 5 if n <= 1000 else 3)
    return dispatch_s, plan_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 256, 1000, 4000])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = {}
    print(f"{'instances':>10} {'dispatch (us)':>14} {'plan round (ms)':>16}")
    for n in args.sizes:
        d, p = measure(n, args.seed)
        results[n] = (d, p)
        print(f"{n:>10} {d * 1e6:>14.1f} {p * 1e3:>16.2f}", flush=True)
    ref = results.get(1000) or results[max(results)]
    print(f"dispatch_us_1000={ref[0] * 1e6:.1f} plan_ms_1000={ref[1] * 1e3:.2f}")


if __name__ == "__main__":
    main()
