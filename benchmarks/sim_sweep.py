"""Sweeps of the dispatch and migration policies in the simulator, from light load to past saturation
(`python -m benchmarks.sim_policies --sweep ...`, which calls `run_sweep`).

For each length distribution (`--lengths`: the Azure conversation, BurstGPT and Mooncake traces' lengths scaled
to the model, and Llumnix's Zipf lengths), each instance count (`--grid-instances`) and each CV of the gamma
arrival gaps (`--grid-cvs`), the request rate goes from light to past saturation (`--rate-fractions` of an
estimate of the cluster's capacity from the cost model) and four policies run on the same requests:
- rr:          round-robin dispatch, no migration;
- leastload:   fewest running + waiting, no migration;
- leastload+m: least-load dispatch with Tidal's rebalancing by live migration;
- tidal:       freeness dispatch (Llumnix virtual usage) with rebalancing.
The knee of a curve is the highest rate at which Tidal's P99 TTFT stays under 5x its value at the lightest
rate; the ratios reported for a curve are at its knee, and the headline is their geometric mean over curves.

At each knee two more tables:
- ablation: Tidal with each policy lever switched the other way (de-fragmentation, reserving the destination's
  blocks up front, the queueing-delay trigger, dispatch on expected output), P99 TTFT relative to Tidal's;
- priorities: the same requests with `high_share` of them at priority 1, against all at priority 0: the high
  class's mean end-to-end speedup and P99 TTFT, and what it costs the normal class (mean end-to-end).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, replace

from orchestrator.bench.traces import load_trace, scale_lengths
from orchestrator.bench.schedule import arrival_gaps
from orchestrator.bench.stats import percentile
from orchestrator.sim.cluster import MigrationCost, RequestRecord, SimConfig, SimRequest, simulate
from orchestrator.sim.cost_model import GPU_7B_KV_BLOCKS, StepCostModel, StepWork, load_cost_model

LENGTHS = ("azure-conv", "burstgpt", "mooncake", "zipf")
POLICIES = ("rr", "leastload", "leastload+m", "tidal")
KNEE_FACTOR = 5.0
HIGH_SHARE = 0.1             # share of priority-1 requests in the priority runs
QUEUE_DELAY_S = 0.5          # the queueing-delay trigger's setting in its ablation row
ZIPF_THETA = 1.0             # Llumnix's Zipf lengths (OSDI '24, section 6.1) use a power law; theta 1 here


@dataclass(frozen=True)
class Regime:
    """The model the cost stands for: KV capacity per instance and the lengths' 99th percentiles."""

    cost: StepCostModel
    num_blocks: int
    max_prompt: int
    max_output: int
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512


def regime(cost_model: str, num_blocks: int) -> Regime:
    if cost_model == "gpu-7b":         # LLaMA-7B on an A10: ~15.6k tokens of KV, ShareGPT-like lengths
        return Regime(load_cost_model("gpu-7b"), GPU_7B_KV_BLOCKS, 2048, 512, max_num_seqs=128,
                      max_num_batched_tokens=2048)
    return Regime(load_cost_model("cpu"), num_blocks, 768, 128)


def zipf_lengths(n: int, high: int, rng: random.Random) -> list[int]:
    weights = [1.0 / (k ** ZIPF_THETA) for k in range(1, high + 1)]
    return rng.choices(range(1, high + 1), weights=weights, k=n)


def lengths(kind: str, n: int, reg: Regime, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(f"{seed}-{kind}-lengths")
    if kind == "zipf":
        return list(zip(zipf_lengths(n, reg.max_prompt, rng), zipf_lengths(n, reg.max_output, rng)))
    rows = scale_lengths(load_trace(kind), reg.max_prompt, reg.max_output)
    return [(r.prompt_tokens, r.output_tokens) for r in rng.choices(rows, k=n)]


def capacity(reg: Regime, shapes: list[tuple[int, int]], instances: int) -> float:
    """A rough estimate of the requests per second the cluster sustains: full-KV decode batches, each request
    paying its prefill and its share of decode steps."""
    mean_prompt = statistics.fmean(p for p, _ in shapes)
    mean_out = statistics.fmean(o for _, o in shapes)
    ctx = mean_prompt + mean_out / 2
    batch = max(1, min(reg.max_num_seqs, int(reg.num_blocks * 16 / (ctx + 16))))
    step = reg.cost.work_seconds(StepWork(tokens=batch, samples=batch, decode_attn=int(batch * ctx)))
    prefill = reg.cost.work_seconds(StepWork(tokens=int(mean_prompt), samples=1,
                                             prefill_attn=int(mean_prompt * mean_prompt)))
    return instances / (prefill + mean_out * step / batch)


def workload(shapes: list[tuple[int, int]], rate: float, cv: float, seed: int,
             high_share: float = 0.0) -> list[SimRequest]:
    gaps = arrival_gaps(len(shapes), rate, cv, random.Random(f"{seed}-arrivals"))
    pick = random.Random(f"{seed}-priority")
    out, t = [], 0.0
    for (p, o), gap in zip(shapes, [0.0, *gaps[1:]]):
        t += gap
        out.append(SimRequest(t, p, o, int(pick.random() < high_share)))
    return out


def configs(reg: Regime, instances: int, seed: int) -> dict[str, SimConfig]:
    base = SimConfig(num_instances=instances, num_blocks=reg.num_blocks, max_model_len=reg.num_blocks * 16,
                     max_num_seqs=reg.max_num_seqs, max_num_batched_tokens=reg.max_num_batched_tokens, seed=seed)
    return {"rr": replace(base, dispatch="round-robin", migrate=False),
            "leastload": replace(base, dispatch="least-load", migrate=False),
            "leastload+m": replace(base, dispatch="least-load", migrate=True),
            "tidal": replace(base, dispatch="freeness", migrate=True)}


def ablations(tidal: SimConfig) -> dict[str, SimConfig]:
    """Tidal with one lever switched from its default each (the defaults are the product's)."""
    mig, cost = tidal.migration, tidal.migration_cost
    return {
        f"defrag {'off' if mig.defrag else 'on'}": replace(tidal, migration=mig.model_copy(
            update={"defrag": not mig.defrag})),
        f"reserve upfront {'off' if cost.reserve_upfront else 'on'}": replace(tidal, migration_cost=replace(
            cost, reserve_upfront=not cost.reserve_upfront)),
        f"queue delay {'off' if mig.queue_delay_s else f'{QUEUE_DELAY_S:g} s'}": replace(tidal, migration=(
            mig.model_copy(update={"queue_delay_s": 0.0 if mig.queue_delay_s else QUEUE_DELAY_S}))),
        f"expected output {'off' if tidal.output_weight else 'on'}": replace(
            tidal, output_weight=0.0 if tidal.output_weight else 1.0),
    }


@dataclass
class Point:
    lengths: str
    instances: int
    cv: float
    rate: float
    policy: str
    p99_ttft: float
    mean_ttft: float
    p99_tpot: float
    preemptions: int
    migrations: int


def run_curve(kind: str, instances: int, cv: float, fractions: list[float], reg: Regime, n: int, seed: int,
              log=print) -> list[Point]:
    shapes = lengths(kind, n, reg, seed)
    cap = capacity(reg, shapes, instances)
    points = []
    for frac in fractions:
        wl = workload(shapes, frac * cap, cv, seed)
        for policy, cfg in configs(reg, instances, seed).items():
            res = simulate(wl, cfg, reg.cost)
            ttft = [r.ttft_s for r in res.finished]
            tpot = [r.tpot_s for r in res.finished if r.tpot_s is not None]
            points.append(Point(kind, instances, cv, frac * cap, policy, percentile(ttft, 99), statistics.fmean(ttft),
                                percentile(tpot, 99) if tpot else math.nan, res.preemptions, res.migrations))
            p = points[-1]
            log(f"{kind:>10} {instances:4d} {cv:4g} {p.rate:7.2f} {policy:>11} {1000 * p.p99_ttft:10.0f} "
                f"{1000 * p.mean_ttft:10.0f} {1000 * p.p99_tpot:9.0f} {p.preemptions:8d} {p.migrations:6d}")
    return points


def _p99_ttft(records: list[RequestRecord]) -> float:
    return percentile([r.ttft_s for r in records], 99)


def ablation_rows(kind: str, instances: int, cv: float, rate: float, reg: Regime, n: int, seed: int,
                  log=print) -> dict[str, float]:
    """At one point: each ablation's P99 TTFT over Tidal's."""
    wl = workload(lengths(kind, n, reg, seed), rate, cv, seed)
    tidal = configs(reg, instances, seed)["tidal"]
    base = simulate(wl, tidal, reg.cost)
    out = {}
    log(f"{'':>10} ablation at {rate:.2f} req/s: tidal P99 TTFT {1000 * _p99_ttft(base.finished):.0f} ms, "
        f"{base.migrations} migrations, {base.migrations_aborted} aborted")
    for name, cfg in ablations(tidal).items():
        res = simulate(wl, cfg, reg.cost)
        out[name] = _p99_ttft(res.finished) / _p99_ttft(base.finished)
        log(f"{'':>12} {name:<22} P99 TTFT {1000 * _p99_ttft(res.finished):8.0f} ms  x{out[name]:.2f}  "
            f"migrations {res.migrations:5d}  aborted {res.migrations_aborted:4d}  preemptions {res.preemptions}")
    return out


def priority_rows(kind: str, instances: int, cv: float, rate: float, reg: Regime, n: int, seed: int,
                  log=print) -> tuple[float, float]:
    """At one point: (the high class's mean e2e speedup, the normal class's mean e2e cost) of Tidal with
    HIGH_SHARE of the requests at priority 1, against the same requests all at priority 0."""
    mixed = workload(lengths(kind, n, reg, seed), rate, cv, seed, HIGH_SHARE)
    high = {f"req-{i}" for i, w in enumerate(mixed) if w.priority > 0}
    tidal = configs(reg, instances, seed)["tidal"]
    runs = {"no priorities": simulate([replace(w, priority=0) for w in mixed], tidal, reg.cost).finished,
            "priorities": simulate(mixed, tidal, reg.cost).finished}
    mean = {}
    for run, recs in runs.items():
        for cls, name in ((True, "high"), (False, "normal")):
            mine = [r for r in recs if (r.request_id in high) == cls]
            mean[run, cls] = statistics.fmean(r.e2e_s for r in mine)
            log(f"{'':>12} {run:>13} {name:>6}: {len(mine):5d} requests, mean e2e {1000 * mean[run, cls]:8.0f} ms, "
                f"P99 TTFT {1000 * _p99_ttft(mine):8.0f} ms")
    speedup = mean["no priorities", True] / mean["priorities", True]
    cost = mean["priorities", False] / mean["no priorities", False]
    log(f"{'':>12} high-priority speedup {speedup:.2f}x, normal-priority cost x{cost:.3f}")
    return speedup, cost


def knee(points: list[Point]) -> tuple[float, dict[str, float]]:
    """(the knee's rate, policy -> P99 TTFT ratio over Tidal there) of one curve's points."""
    tidal = sorted((p for p in points if p.policy == "tidal"), key=lambda p: p.rate)
    light = tidal[0].p99_ttft
    at = max((p.rate for p in tidal if p.p99_ttft < KNEE_FACTOR * light), default=tidal[0].rate)
    here = {p.policy: p.p99_ttft for p in points if p.rate == at}
    return at, {k: v / here["tidal"] for k, v in here.items() if k != "tidal"}


def plot(points: list[Point], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = sorted({(p.lengths, p.instances, p.cv) for p in points})
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (kind, n, cv) in zip(axes[0], curves):
        for policy in POLICIES:
            mine = sorted((p for p in points if (p.lengths, p.instances, p.cv, p.policy) == (kind, n, cv, policy)),
                          key=lambda p: p.rate)
            ax.plot([p.rate for p in mine], [p.p99_ttft for p in mine], marker="o", label=policy)
        ax.set_yscale("log")
        ax.set_title(f"{kind}, {n} instances, CV {cv:g}")
        ax.set_xlabel("requests / s")
        ax.set_ylabel("P99 TTFT (s)")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path)


SENSITIVITY = {        # gpu-7b parameters varied one at a time, x0.5 and x2
    "KV blocks": lambda reg, f: replace(reg, num_blocks=int(reg.num_blocks * f)),
    "fixed step time": lambda reg, f: replace(reg, cost=replace(reg.cost, step_s=reg.cost.step_s * f)),
    "per-token time": lambda reg, f: replace(reg, cost=replace(reg.cost, tokens_s=reg.cost.tokens_s * f)),
    "attention time": lambda reg, f: replace(reg, cost=replace(reg.cost, decode_attn_s=reg.cost.decode_attn_s * f,
                                                                 prefill_attn_s=reg.cost.prefill_attn_s * f)),
}


def run_sensitivity(kind: str, instances: int, cv: float, fractions: list[float], n: int, seed: int) -> None:
    """The knee ratios of one gpu-7b curve with each cost-model parameter halved and doubled."""
    base = regime("gpu-7b", 0)
    print(f"sensitivity of the gpu-7b knee ratios: {kind}, {instances} instances, CV {cv:g}, {n} requests per point")
    for name, vary in [("as derived", lambda reg, f: reg), *SENSITIVITY.items()]:
        for f in ((1.0,) if name == "as derived" else (0.5, 2.0)):
            reg = vary(base, f)
            points = run_curve(kind, instances, cv, fractions, reg, n, seed, log=lambda *_: None)
            at, r = knee(points)
            print(f"  {name:>16} x{f:<3g} knee {at:7.2f} req/s: " + ", ".join(f"{k}/tidal {v:5.2f}" for k, v in r.items()),
                  flush=True)


def geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def run_sweep(cost_model: str, num_blocks: int, kinds: list[str], grid_instances: list[int], cvs: list[float],
              fractions: list[float], n: int, seed: int, png: str | None, extras: bool = True) -> dict[str, float]:
    """Every curve, its knee and (`extras`) the ablation and priority rows there; the geometric means over
    curves of the knee ratios (`rr`, `leastload`, `leastload+m`), of the high class's speedup
    (`high_priority_speedup`) and of the normal class's cost (`normal_priority_cost`)."""
    reg = regime(cost_model, num_blocks)
    print(f"cost model {cost_model}: {reg.num_blocks} KV blocks x 16 tokens per instance, lengths' p99 -> "
          f"{reg.max_prompt}/{reg.max_output}; {n} requests per point per 16 instances; rates = {fractions} x estimated capacity")
    print(f"{'lengths':>10} {'inst':>4} {'CV':>4} {'rate':>7} {'policy':>11} {'P99 TTFT':>10} {'mean TTFT':>10} "
          f"{'P99 TPOT':>9} {'preempt':>8} {'migr':>6}   (ms)")
    all_points, ratios = [], {k: [] for k in POLICIES if k != "tidal"}
    lever_ratios: dict[str, list[float]] = {}
    speedups, costs = [], []
    for kind in kinds:
        for instances in grid_instances:
            for cv in cvs:
                points = run_curve(kind, instances, cv, fractions, reg, n * instances // 16, seed)
                at, r = knee(points)
                print(f"{'':>10} knee at {at:.2f} req/s: " + ", ".join(f"{k}/tidal {v:.2f}" for k, v in r.items()),
                      flush=True)
                for k, v in r.items():
                    ratios[k].append(v)
                all_points += points
                if extras:
                    m = n * instances // 16
                    for k, v in ablation_rows(kind, instances, cv, at, reg, m, seed).items():
                        lever_ratios.setdefault(k, []).append(v)
                    speedup, cost = priority_rows(kind, instances, cv, at, reg, m, seed)
                    speedups.append(speedup)
                    costs.append(cost)
    if png:
        plot(all_points, png)
        print(f"plot: {png}")
    for k, v in lever_ratios.items():
        print(f"ablation {k}: P99 TTFT x{geomean(v):.2f} of tidal's at the knees (geometric mean)")
    out = {k: geomean(v) for k, v in ratios.items()}
    if extras:
        out.update(high_priority_speedup=geomean(speedups), normal_priority_cost=geomean(costs))
    return out
