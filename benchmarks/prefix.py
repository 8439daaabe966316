"""Prefix caching and prefix-aware dispatch on the Mooncake conversation trace, in the simulator.

    python -m benchmarks.prefix [--requests 1500] [--instances 4] [--rate-scale 8] [--scale 32]
                                [--num-blocks 976] [--cost-model gpu-7b|cpu] [--prefix-weight 1]

Workload: the first `--requests` rows of the Mooncake FAST '25 conversation trace (kvcache-ai/Mooncake at
3b5a5941, FAST25-release/traces/conversation_trace.jsonl, Apache-2.0; ../shared/data/mooncake/SOURCE.md),
read from the shared data folder, never copied here. Arrivals are the trace's timestamps sped up
`--rate-scale` times; lengths are divided by one factor `--scale` (shape kept, as `scale_lengths` does), and so
is the trace's 512-token hash block, so that each hash id stands for 512 / scale tokens. Prompts are built from
the hash ids (`orchestrator.bench.traces.hash_block_prompt`): equal ids give equal tokens, so the sharing the trace
records is what the prefix caches see. The bound is the share of block references that repeat an earlier one
(an infinite cache's block hit rate over these rows: 36.6 % over the whole trace).

Instances: `orchestrator/sim` (the engine's own batch scheduler, block pool and prefix cache), step times from
a cost model: `gpu-7b` (default: LLaMA-7B on an A10 from datasheet arithmetic, 976 blocks of 16 tokens each,
orchestrator/sim/cost_model.py) or `cpu` (fitted to the native engine on SmolLM2-135M on this machine).

Policies (the real functions of orchestrator/policies):
- rr:         round-robin dispatch, no prefix caching, no migration;
- leastload:  least-load dispatch, prefix caching on, no migration;
- tidal:      prefix-aware dispatch (orchestrator/policies/prefix.py) with prefix caching and live migration
              (the default migration policy; a moved request copies only what its destination lacks).
`--real`: instead, the same three policies on real instances (a fresh deployment of `--instances` SmolLM2-135M
instances on CPU per policy; `--real-requests` rows from the same trace, their arrivals stretched to a mean of
`--real-rate` per second; with `--real-conversations`, only rows of the first 1,500 whose first two hash ids
at least three rows share — the trace's reuse is minutes apart, which a short run would not reach —), sent over gRPC by the `tidal bench replay` engine, whose prompts are built from the
hash ids with the real tokenizer; prefill tokens and hit rates are read from the instances' loads.

Reported: TTFT mean / P50 / P99, prompt tokens computed (prefill, recomputation after preemption included),
prefix hit rate (admitted tokens found cached), preemptions, migrations. Last line:
    ttft_mean_ratio_rr_over_tidal=<x> ttft_p99_ratio_leastload_over_tidal=<y> hit_rate=<tidal's> bound=<trace's>
Goals (issue 16): >= 3, >= 1.5, hit rate within 10 % of the bound.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from collections import Counter
from dataclasses import replace

from orchestrator.bench.traces import hash_block_prompt, load_trace, scale_lengths, shared_block_fraction
from orchestrator.bench.stats import percentile
from orchestrator.sim.cluster import SimConfig, SimRequest, SimResult, simulate
from orchestrator.sim.cost_model import COST_MODELS, load_cost_model
from orchestrator.sim.instance import SIM_VOCAB

TRACE = "mooncake"


def _block(h: int, n: int) -> list[int]:
    """The tokens of trace block `h`: the same for every request that has it."""
    rng = random.Random(h)
    return [rng.randrange(SIM_VOCAB) for _ in range(n)]


def workload(requests: int, scale: float, rate_scale: float, max_prompt: int, max_output: int) -> tuple[list, float]:
    rows = load_trace(TRACE, limit=requests)
    bound = shared_block_fraction(rows)
    rows = scale_lengths(rows, max_prompt, max_output, factor=scale)
    out = []
    for i, r in enumerate(rows):
        own = random.Random(f"own-{i}")
        ids = hash_block_prompt(r.hash_ids, r.prompt_tokens, r.block_tokens, _block,
                                lambda k: [own.randrange(SIM_VOCAB) for _ in range(k)])
        out.append(SimRequest(r.arrival_s / rate_scale, r.prompt_tokens, r.output_tokens, token_ids=tuple(ids)))
    return out, bound


def policies(args) -> dict[str, SimConfig]:
    base = SimConfig(num_instances=args.instances, num_blocks=args.num_blocks, block_size=16,
                     max_model_len=args.max_prompt + args.max_output, seed=args.seed,
                     prefix_digest_blocks=args.digest_blocks)
    return {"rr": replace(base, dispatch="round-robin", prefix_caching=False, migrate=False),
            "leastload": replace(base, dispatch="least-load", prefix_caching=True, migrate=False),
            "tidal": replace(base, dispatch="prefix-aware", prefix_caching=True, migrate=True,
                             prefix_weight=args.prefix_weight)}


def prefill_tokens(res: SimResult) -> int:
    """Prompt tokens computed: all computed tokens less one fed per decode step (a request's last token never is)."""
    return res.computed_tokens - sum(max(0, r.output_tokens - 1) for r in res.finished)


def real(args) -> int:
    """The three policies on real SmolLM2-135M instances over gRPC."""
    from benchmarks.serving_load import at_rate, deploy, replay
    from instance.model.loader import load_tokenizer
    from orchestrator.bench.replay import PromptSource
    from orchestrator.bench.stats import Slo, summarize

    if args.real_conversations:
        window = load_trace(TRACE, limit=1500)
        heads = Counter(r.hash_ids[:2] for r in window)
        rows = [r for r in window if len(r.hash_ids) > 1 and heads[r.hash_ids[:2]] >= 3][:args.real_requests]
    else:
        rows = load_trace(TRACE, limit=args.real_requests)
    bound = shared_block_fraction(rows)
    rows = scale_lengths(rows, args.real_max_prompt, args.max_output, factor=args.scale)
    plan = [replace(p, hash_ids=r.hash_ids, block_tokens=r.block_tokens)
            for p, r in zip(at_rate(rows, args.real_rate), rows)]
    prompts = PromptSource(load_tokenizer("smollm2-135m"), max(p.prompt_tokens for p in plan), args.seed)
    print(f"{len(plan)} {TRACE} requests at {args.real_rate:g}/s on {args.instances} SmolLM2-135M instances (CPU), "
          f"lengths / {args.scale:g}, mean prompt {statistics.mean(p.prompt_tokens for p in plan):.0f}; "
          f"trace's repeated-block bound {100 * bound:.1f} %")
    serve = {"rr": dict(dispatch_policy="round-robin", rebalance=dict(auto=False)),
             "leastload": dict(dispatch_policy="least-load", rebalance=dict(auto=False)),
             "tidal": dict(dispatch_policy="prefix-aware", rebalance=dict(auto=True))}
    print(f"{'policy':>10} {'done':>6} {'TTFT mean':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'prefill tok':>12} "
          f"{'hit rate':>9}")
    summary = {}
    for name, cfg in serve.items():
        engine = dict(model="smollm2-135m", num_blocks=args.real_num_blocks, prefix_caching=name != "rr",
                      max_model_len=min(2048, 16 * args.real_num_blocks))
        d = deploy(f"bench-prefix-{name}", args.instances, engine, **cfg)
        try:
            records = replay(f"127.0.0.1:{d.port}", plan, prompts)
            loads = [v.status.load for v in d.scheduler.list_instances().result() if v.status is not None]
        finally:
            d.stop()
        s = summarize(records, Slo())
        hit = sum(x.prefix_hit_tokens for x in loads)
        query = sum(x.prefix_query_tokens for x in loads)
        prefill = (query or sum(p.prompt_tokens for p in plan)) - hit
        rate = hit / query if query else 0.0
        summary[name] = (s.ttft.mean, s.ttft.p99, rate)
        print(f"{name:>10} {s.completed:>6} {s.ttft.mean:>8.0f}ms {s.ttft.p50:>7.0f}ms {s.ttft.p99:>7.0f}ms "
              f"{prefill:>12} {100 * rate:>8.1f}%", flush=True)
    tidal = summary["tidal"]
    print(f"ttft_mean_ratio_rr_over_tidal={summary['rr'][0] / tidal[0]:.2f} "
          f"ttft_p99_ratio_leastload_over_tidal={summary['leastload'][1] / tidal[1]:.2f} "
          f"hit_rate={tidal[2]:.3f} bound={bound:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1500, help="first N rows of the trace")
    ap.add_argument("--instances", type=int, default=4)
    ap.add_argument("--rate-scale", type=float, default=8.0, help="speed the trace's clock up X times")
    ap.add_argument("--scale", type=float, default=32.0, help="divide every length (and the 512-token block) by this")
    ap.add_argument("--max-prompt", type=int, default=4000, help="clamp scaled prompts to this many tokens")
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--num-blocks", type=int, default=976, help="KV blocks of 16 tokens per instance")
    ap.add_argument("--cost-model", choices=COST_MODELS, default="gpu-7b")
    ap.add_argument("--prefix-weight", type=float, default=1.0, help="ServeConfig.dispatch_prefix_weight")
    ap.add_argument("--digest-blocks", type=int, default=4096, help="EngineConfig.prefix_digest_blocks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", action="store_true", help="run on real SmolLM2-135M instances instead")
    ap.add_argument("--real-requests", type=int, default=60)
    ap.add_argument("--real-conversations", action="store_true",
                    help="--real: only rows whose prefix at least three rows of the first 1,500 share")
    ap.add_argument("--real-rate", type=float, default=0.5, help="mean requests per second of --real")
    ap.add_argument("--real-max-prompt", type=int, default=768)
    ap.add_argument("--real-num-blocks", type=int, default=256, help="KV blocks of 16 tokens per real instance")
    args = ap.parse_args(argv)
    if args.real:
        return real(args)
    cost = load_cost_model(args.cost_model)
    work, bound = workload(args.requests, args.scale, args.rate_scale, args.max_prompt, args.max_output)
    span = work[-1].arrival_s
    print(f"{len(work)} {TRACE} requests over {span:.0f} s (trace clock / {args.rate_scale:g}), lengths / "
          f"{args.scale:g} (a hash block = {512 / args.scale:g} tokens), mean prompt "
          f"{statistics.mean(w.prompt_tokens for w in work):.0f}; {args.instances} instances x {args.num_blocks} "
          f"blocks of 16; cost model {args.cost_model}; trace's repeated-block bound {100 * bound:.1f} %")
    print(f"{'policy':>10} {'done':>6} {'TTFT mean':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'prefill tok':>12} "
          f"{'hit rate':>9} {'preempt':>8} {'migr':>6} {'wall s':>7}")
    summary = {}
    for name, cfg in policies(args).items():
        res = simulate(work, cfg, cost)
        ttft = [r.ttft_s for r in res.finished]
        mean, p99 = statistics.mean(ttft), percentile(ttft, 99)
        summary[name] = (mean, p99, res.prefix_hit_rate)
        print(f"{name:>10} {len(res.finished):>6} {1000 * mean:>8.0f}ms {1000 * percentile(ttft, 50):>7.0f}ms "
              f"{1000 * p99:>7.0f}ms {prefill_tokens(res):>12} {100 * res.prefix_hit_rate:>8.1f}% "
              f"{res.preemptions:>8} {res.migrations:>6} {res.wall_s:>7.1f}", flush=True)
        if len(res.finished) != len(work):
            print(f"{name}: only {len(res.finished)} of {len(work)} requests finished", file=sys.stderr)
            return 1
    tidal = summary["tidal"]
    print(f"ttft_mean_ratio_rr_over_tidal={summary['rr'][0] / tidal[0]:.2f} "
          f"ttft_p99_ratio_leastload_over_tidal={summary['leastload'][1] / tidal[1]:.2f} "
          f"hit_rate={tidal[2]:.3f} bound={bound:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
