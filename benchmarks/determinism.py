"""Deterministic mode against the fast path: what it costs, and whether disturbed streams still come out exact.

    python -m benchmarks.determinism [--model tiny-llama] [--requests 1000] [--failovers 3] [--cost-model M]

1. Mismatches: `--requests` seeded requests (temperature 0.8, top-p 0.95, EOS ignored) run undisturbed, 16 at a
   time; then each again in a different batch (other requests, another order), cut off at `--failovers` random
   points and resumed from the tokens it had (failover by re-prefill, `resume_from_tokens`), each time beside a
   new set of requests. A request whose tokens differ from its undisturbed run is a mismatch. Live migration
   copies the KV itself, so it adds nothing here beyond batching (tests/e2e cover it end to end).
2. Cost, on `--cost-model` (default SmolLM2-135M): CPU seconds of the same workload on both paths, and the
   decode step at batch 1, 8 and 32, and prefill tokens per CPU second. One thread per engine (what an
   instance gets); process CPU time, so other load on the machine matters less than for wall-clock timings.

Last line: `deterministic_cost_ratio=<x> mismatches=<n> mismatches_fast=<m>`. Goals (issue 15): mismatches 0,
cost ratio <= 1.25.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from instance.engine import Engine
from instance.sampling import SamplingParams

BATCH = 16


def _params(seed: int, n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True)


def _drain(engine: Engine, into: dict[str, list[int]], stop_after: dict[str, int] | None = None) -> None:
    """Step until nothing is left; a request in `stop_after` is aborted once it has that many tokens."""
    while engine.has_unfinished():
        for out in engine.step():
            into.setdefault(out.request_id, []).extend(out.new_token_ids)
            if stop_after and out.request_id in stop_after and len(into[out.request_id]) >= stop_after[out.request_id]:
                engine.abort(out.request_id)
                del stop_after[out.request_id]


def mismatches(model: str, deterministic: bool, n: int, failovers: int, out_tokens: int, seed: int) -> int:
    rng = random.Random(seed)
    engine = Engine(model=model, num_blocks=2000, block_size=16, max_model_len=2048, deterministic=deterministic)
    prompts = {f"r{i}": [rng.randrange(3, 200) for _ in range(rng.randrange(8, 200))] for i in range(n)}
    ids = list(prompts)
    reference: dict[str, list[int]] = {}
    for start in range(0, n, BATCH):
        for rid in ids[start:start + BATCH]:
            engine.add_request(rid, prompt_token_ids=prompts[rid], params=_params(int(rid[1:]), out_tokens))
        _drain(engine, reference)
    bad = 0
    order = ids[:]
    rng.shuffle(order)
    for start in range(0, n, BATCH):
        group = order[start:start + BATCH]
        got: dict[str, list[int]] = {}
        cuts = {rid: sorted(rng.sample(range(1, out_tokens), failovers)) for rid in group}
        for rid in group:
            engine.add_request(rid, prompt_token_ids=prompts[rid], params=_params(int(rid[1:]), out_tokens))
        for k in range(failovers + 1):
            stop = {rid: cuts[rid][k] for rid in group if k < failovers}
            _drain(engine, got, stop)
            if k == failovers:
                break
            for rid in group:            # resumed from what it streamed, in another batch order
                have = got[rid][:cuts[rid][k]]
                got[rid] = have
            rng.shuffle(group)
            for rid in group:
                engine.resume_from_tokens(rid, prompts[rid], got[rid], _params(int(rid[1:]), out_tokens),
                                          int(rid[1:]), 0, 0)
        bad += sum(got[rid] != reference[rid] for rid in group)
    engine.check_integrity()
    return bad


def cost(model: str, requests: int, out_tokens: int) -> dict:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.randrange(20, 300))] for _ in range(requests)]
    greedy = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
    engines = {d: Engine(model=model, num_blocks=1500, block_size=16, max_model_len=2048, deterministic=d)
               for d in (False, True)}
    out: dict = {}
    for d, e in engines.items():                  # warm up
        e.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    for rep in range(2):                          # interleaved, best of two
        for d, e in engines.items():
            t0 = time.process_time()
            e.generate(prompts, greedy)
            out[("workload", d)] = min(out.get(("workload", d), 1e9), time.process_time() - t0)
    for d, e in engines.items():
        for b in (1, 8, 32):
            for i in range(b):
                e.add_request(f"d{b}-{i}", prompt_token_ids=prompts[i % requests][:64],
                              params=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
            e.step()
            e.step()
            t0, steps = time.process_time(), 0
            while e.has_unfinished():
                e.step()
                steps += 1
            out[(f"decode_b{b}_ms", d)] = 1000 * (time.process_time() - t0) / steps
        t0 = time.process_time()
        e.generate([prompts[0] * 4], SamplingParams(max_tokens=1, temperature=0.0))
        out[("prefill_tok_per_cpu_s", d)] = len(prompts[0]) * 4 / (time.process_time() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama", help="model of the mismatch check")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--failovers", type=int, default=3, help="re-prefills per request in the disturbed pass")
    ap.add_argument("--output-tokens", type=int, default=48)
    ap.add_argument("--cost-model", default="smollm2-135m", help="model of the cost measurement")
    ap.add_argument("--cost-requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bad_det = mismatches(args.model, True, args.requests, args.failovers, args.output_tokens, args.seed)
    bad_fast = mismatches(args.model, False, args.requests, args.failovers, args.output_tokens, args.seed)
    print(f"{args.requests} seeded requests x {args.failovers} failovers in other batches ({args.model}): "
          f"deterministic {bad_det} mismatches, fast path {bad_fast}")
    c = cost(args.cost_model, args.cost_requests, 32)
    print(f"cost on {args.cost_model} (CPU seconds, one thread): fast / deterministic")
    for key in ("workload", "decode_b1_ms", "decode_b8_ms", "decode_b32_ms", "prefill_tok_per_cpu_s"):
        print(f"  {key:24s} {c[(key, False)]:10.2f} {c[(key, True)]:10.2f}")
    ratio = c[("workload", True)] / c[("workload", False)]
    print(f"deterministic_cost_ratio={ratio:.2f} mismatches={bad_det} mismatches_fast={bad_fast}")


if __name__ == "__main__":
    main()
