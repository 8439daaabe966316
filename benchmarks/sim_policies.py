"""Dispatch and migration policies in the simulator: round-robin vs least-load (both without migration) vs
Tidal (freeness dispatch + live migration) on 16 simulated instances, and Tidal's priorities.

    python -m benchmarks.sim_policies [--instances 16] [--rate 3] [--cvs 2 4 6] [--num-blocks 64]
                                      [--requests 2000] [--seeds 0 1 2] [--priorities] [--cost PATH]

Instances: `orchestrator/sim` (the real batch scheduler and block pool of `instance/`, step times from the cost
model fitted to the native engine's measured steps on SmolLM2-135M, orchestrator/sim/step_costs.json), each with
`--num-blocks` KV blocks of 16 tokens (64 = 1,024 tokens: a p99 prompt of 768 tokens takes three quarters of an
instance's KV, so memory, not the batch limit of 64, bounds the batch), 512 batched tokens per step. The frontend
dispatches on load snapshots pushed every 50 ms plus what it sent since; the migration policy runs every 0.5 s (the
live defaults).

Workload: `--requests` rows of the Azure LLM conversation trace (azure_llm_2023/AzureLLMInferenceTrace_conv.csv,
Azure/AzurePublicDataset, Splitwise, Patel et al., ISCA 2024, CC-BY 4.0; see ../shared/data/azure_llm_2023/
SOURCE.md), drawn with `sample_rows(seed)`, lengths scaled by one factor so their 99th percentiles fit 768
prompt / 128 output tokens (as benchmarks/policies.py does), arrivals BurstGPT-like: gamma-distributed gaps at
`--rate` requests per second with coefficient of variation CV (BurstGPT, Wang et al., KDD '25, fits gamma
arrivals; each CV in `--cvs` is one run per seed). Every request generates its traced output length.

Policies (the real functions of orchestrator/policies, unmodified):
- rr:        round-robin dispatch, no migration;
- leastload: fewest running + waiting requests, no migration;
- tidal:     freeness dispatch (Llumnix virtual usage) + rebalancing by live migration (`--source-freeness`,
             `--target-freeness`, `--max-moves` per round).
Reported per CV (requests of all seeds pooled): TTFT P50/P99, TPOT P99, preemptions, migrations; and over all
CVs. The last line is the geometric mean over CVs of the P99 TTFT ratios:
    p99_ttft_ratio_rr_over_tidal=<x> p99_ttft_ratio_leastload_over_tidal=<y>
Goals (issue 7): >= 10 and >= 2.

`--sweep`: instead, the sweep of `benchmarks/sim_sweep.py` (rates from light load past saturation x `--grid-cvs`
x `--lengths` x `--grid-instances`, four policies, an ablation of each policy lever and the priority runs at
each curve's knee), with `--cost-model cpu` (the fitted CPU model above) or `gpu-7b` (LLaMA-7B on an A10-class
GPU from datasheet arithmetic, orchestrator/sim/cost_model.py), `--plot PNG`, and `--sensitivity` (the knee
ratios as the GPU model's constants move). Last line:
    p99_ttft_ratio_rr_over_tidal=<x> leastload_over_tidal=<y> high_priority_speedup=<z>

`--priorities`: instead, Tidal with and without priorities on the same workload where `--high-share` (10%) of
the requests have priority 1: mean end-to-end latency of each class, the high class's speedup (mean e2e with
all requests at priority 0 / with priorities) and the normal class's cost. Last line:
    high_priority_speedup=<x> normal_priority_cost=<y>
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from dataclasses import replace

from benchmarks.sim_sweep import LENGTHS, run_sensitivity, run_sweep
from orchestrator.bench.traces import load_trace, sample_rows, scale_lengths
from orchestrator.bench.schedule import arrival_gaps
from orchestrator.bench.stats import percentile
from orchestrator.policies.dispatch import HIGH_PRIORITY_HEADROOM
from orchestrator.policies.migration import MigrationPolicyConfig
from orchestrator.sim.cluster import RequestRecord, SimConfig, SimRequest, simulate
from orchestrator.sim.cost_model import COST_MODELS, DEFAULT_PATH, StepCostModel

TRACE = "azure-conv"
POLICY = MigrationPolicyConfig()       # the defaults
MAX_PROMPT, MAX_OUTPUT = 768, 128


def workload(n: int, rate: float, cv: float, seed: int, high_share: float = 0.0) -> list[SimRequest]:
    rows = sample_rows(scale_lengths(load_trace(TRACE), MAX_PROMPT, MAX_OUTPUT), n, seed)
    gaps = arrival_gaps(n, rate, cv, random.Random(f"{seed}-arrivals"))
    pick = random.Random(f"{seed}-priority")
    out, t = [], 0.0
    for row, gap in zip(rows, [0.0, *gaps[1:]]):
        t += gap
        out.append(SimRequest(t, row.prompt_tokens, row.output_tokens, int(pick.random() < high_share)))
    return out


def policies(args) -> dict[str, SimConfig]:
    base = SimConfig(num_instances=args.instances, num_blocks=args.num_blocks,
                     max_model_len=min(2048, args.num_blocks * 16))
    mig = MigrationPolicyConfig(source_freeness=args.source_freeness, target_freeness=args.target_freeness,
                                max_moves=args.max_moves, cooldown_s=args.cooldown,
                                high_priority_headroom=args.headroom)
    return {"rr": replace(base, dispatch="round-robin", migrate=False),
            "leastload": replace(base, dispatch="least-load", migrate=False),
            "tidal": replace(base, dispatch="freeness", migrate=True, migration=mig, top_k=args.top_k,
                             high_priority_headroom=args.headroom)}


def _ms(x: float) -> str:
    return f"{1000 * x:9.0f}" if not math.isnan(x) else f"{'-':>9}"


def compare(args, cost: StepCostModel) -> int:
    configs = policies(args)
    print(f"{args.instances} instances x {args.num_blocks} blocks of 16 tokens; {args.requests} {TRACE} requests "
          f"per run (p99 lengths -> {MAX_PROMPT}/{MAX_OUTPUT}); gamma arrivals at {args.rate:g} req/s; "
          f"seeds {args.seeds}")
    print(f"{'CV':>4} {'policy':>10} {'done':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p99':>9} "
          f"{'preempt':>8} {'migr':>6} {'sim s':>6} {'wall s':>6}")
    ratios: dict[str, list[float]] = {"rr": [], "leastload": []}
    for cv in args.cvs:
        p99 = {}
        for name, cfg in configs.items():
            recs: list[RequestRecord] = []
            pre = mig = 0
            sim_s = wall_s = 0.0
            for seed in args.seeds:
                res = simulate(workload(args.requests, args.rate, cv, seed), replace(cfg, seed=seed), cost)
                recs += res.finished
                pre, mig = pre + res.preemptions, mig + res.migrations
                sim_s, wall_s = sim_s + res.end_s, wall_s + res.wall_s
            ttft = [r.ttft_s for r in recs]
            tpot = [r.tpot_s for r in recs if r.tpot_s is not None]
            p99[name] = percentile(ttft, 99)
            print(f"{cv:4g} {name:>10} {len(recs):6d} {_ms(percentile(ttft, 50))} {_ms(p99[name])} "
                  f"{_ms(percentile(tpot, 99))} {pre:8d} {mig:6d} {sim_s:6.0f} {wall_s:6.1f}", flush=True)
        for k in ratios:
            ratios[k].append(p99[k] / p99["tidal"])
        print(f"{'':4} P99 TTFT rr/tidal {ratios['rr'][-1]:.2f}, leastload/tidal {ratios['leastload'][-1]:.2f}")
    print("(times in ms; done = finished requests over all seeds; sim s = simulated seconds, summed over seeds)")
    g = {k: math.exp(statistics.fmean(math.log(x) for x in v)) for k, v in ratios.items()}
    print(f"p99_ttft_ratio_rr_over_tidal={g['rr']:.2f} p99_ttft_ratio_leastload_over_tidal={g['leastload']:.2f}")
    return 0


def priorities(args, cost: StepCostModel) -> int:
    tidal = policies(args)["tidal"]
    print(f"Tidal on {args.instances} instances x {args.num_blocks} blocks; {args.requests} requests per run, "
          f"{args.high_share:.0%} at priority 1; gamma arrivals at {args.rate:g} req/s; seeds {args.seeds}; "
          f"high-priority headroom {tidal.high_priority_headroom:g} x capacity per request")
    print(f"{'CV':>4} {'run':>16} {'class':>7} {'n':>6} {'e2e mean':>9} {'e2e p99':>9} {'TTFT p99':>9} "
          f"{'TPOT mean':>9}")
    high_speedups, normal_costs = [], []
    for cv in args.cvs:
        means = {}
        for run in ("no priorities", "priorities"):
            recs: list[RequestRecord] = []
            for seed in args.seeds:
                wl = workload(args.requests, args.rate, cv, seed, args.high_share)
                marked = {i for i, w in enumerate(wl) if w.priority > 0}
                if run == "no priorities":
                    wl = [replace(w, priority=0) for w in wl]
                res = simulate(wl, replace(tidal, seed=seed), cost)
                for r in res.finished:
                    r.priority = int(int(r.request_id.split("-")[1]) in marked)   # the class it has in the mix
                recs += res.finished
            for cls, name in ((1, "high"), (0, "normal")):
                mine = [r for r in recs if r.priority == cls]
                e2e = [r.e2e_s for r in mine]
                means[run, cls] = statistics.fmean(e2e)
                tpot = [r.tpot_s for r in mine if r.tpot_s is not None]
                print(f"{cv:4g} {run:>16} {name:>7} {len(mine):6d} {_ms(means[run, cls])} {_ms(percentile(e2e, 99))} "
                      f"{_ms(percentile([r.ttft_s for r in mine], 99))} {_ms(statistics.fmean(tpot))}")
        high_speedups.append(means["no priorities", 1] / means["priorities", 1])
        normal_costs.append(means["priorities", 0] / means["no priorities", 0])
        print(f"{'':4} high-priority mean e2e speedup {high_speedups[-1]:.2f}x; normal-priority mean e2e "
              f"x{normal_costs[-1]:.3f}")
    print("(times in ms; the same requests, once all at priority 0, once with the mix)")
    g = lambda v: math.exp(statistics.fmean(math.log(x) for x in v))   # noqa: E731
    print(f"high_priority_speedup={g(high_speedups):.2f} normal_priority_cost={g(normal_costs):.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=64, help="KV blocks of 16 tokens per instance")
    ap.add_argument("--rate", type=float, default=3.0, help="mean arrivals per second")
    ap.add_argument("--cvs", type=float, nargs="+", default=[2.0, 4.0, 6.0], help="CVs of the gamma gaps")
    ap.add_argument("--requests", type=int, default=2000, help="requests per run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--source-freeness", type=float, default=POLICY.source_freeness)
    ap.add_argument("--target-freeness", type=float, default=POLICY.target_freeness)
    ap.add_argument("--max-moves", type=int, default=POLICY.max_moves)
    ap.add_argument("--cooldown", type=float, default=POLICY.cooldown_s)
    ap.add_argument("--top-k", type=int, default=1, help="tidal dispatches at random among the k freest")
    ap.add_argument("--headroom", type=float, default=HIGH_PRIORITY_HEADROOM,
                    help="share of an instance's blocks set aside per high-priority request (tidal)")
    ap.add_argument("--priorities", action="store_true", help="run the priority comparison instead")
    ap.add_argument("--high-share", type=float, default=0.1, help="share of priority-1 requests (--priorities)")
    ap.add_argument("--cost", default=str(DEFAULT_PATH), help="the step cost model (benchmarks/step_costs.py)")
    ap.add_argument("--sweep", action="store_true", help="sweep rates x CVs x lengths x instances instead")
    ap.add_argument("--cost-model", choices=COST_MODELS, default="cpu",
                    help="--sweep: cpu (fitted to the native engine) or gpu-7b (LLaMA-7B on an A10)")
    ap.add_argument("--lengths", nargs="+", default=list(LENGTHS), choices=LENGTHS)
    ap.add_argument("--grid-instances", type=int, nargs="+", default=[16])
    ap.add_argument("--grid-cvs", type=float, nargs="+", default=[1.0, 2.0, 4.0, 6.0])
    ap.add_argument("--rate-fractions", type=float, nargs="+", default=[0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                    help="--sweep: request rates, as shares of the cost model's estimate of capacity")
    ap.add_argument("--plot", help="--sweep: write a PNG of P99 TTFT vs rate per policy")
    ap.add_argument("--sensitivity", action="store_true", help="--sweep --cost-model gpu-7b: the knee ratios of "
                    "the first curve with each cost-model parameter halved and doubled, instead")
    args = ap.parse_args(argv)
    if args.sweep and args.sensitivity:
        run_sensitivity(args.lengths[0], args.grid_instances[0], args.grid_cvs[0], args.rate_fractions,
                        args.requests, args.seeds[0])
        return 0
    if args.sweep:
        g = run_sweep(args.cost_model, args.num_blocks, args.lengths, args.grid_instances, args.grid_cvs,
                      args.rate_fractions, args.requests, args.seeds[0], args.plot)
        print(f"p99_ttft_ratio_leastload_migration_over_tidal={g['leastload+m']:.2f} "
              f"normal_priority_cost={g['normal_priority_cost']:.3f}")
        print(f"p99_ttft_ratio_rr_over_tidal={g['rr']:.2f} p99_ttft_ratio_leastload_over_tidal={g['leastload']:.2f} "
              f"high_priority_speedup={g['high_priority_speedup']:.2f}")
        return 0
    cost = StepCostModel.load(args.cost)
    return priorities(args, cost) if args.priorities else compare(args, cost)


if __name__ == "__main__":
    sys.exit(main())
