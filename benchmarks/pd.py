"""Prefill/decode disaggregation against colocated serving: SmolLM2-135M, 4 instances on CPU, requests with
the prompt and output lengths and the arrival pattern of the Azure LLM conversation trace.

    python -m benchmarks.pd [--rates 0.25 0.5 1] [--requests 40] [--configs colocated pd adaptive]
                            [--max-prompt 768] [--max-output 128] [--slo-tpot-x 1.5 4]

Trace: azure_llm_2023/AzureLLMInferenceTrace_conv.csv (Azure/AzurePublicDataset, the conversation trace of
Splitwise, Patel et al., ISCA 2024, CC-BY 4.0; see ../shared/data/azure_llm_2023/SOURCE.md), read through
`orchestrator.bench.traces`. `--requests` consecutive rows from row 1000 on (a busy stretch of the trace); their
lengths scaled by one factor so the 99th percentiles fit `--max-prompt`/`--max-output` (mean prompt 212
tokens, mean output 39 with the defaults), their arrival times scaled so the mean rate is each `--rates`
value (the trace's burstiness is kept). They are sent by the engine of `tidal bench replay`
(orchestrator/bench): prompts are token ids of the traced length (windows of one `synthetic_prompt`
passage), greedy, EOS ignored, so every request generates exactly its traced output length.

Configurations, each a fresh deployment of 4 instances (one CPU and one torch thread each, 0.25 GiB of KV):
- colocated: 4 x both, dispatch by freeness, auto-migration on (Tidal's default);
- pd: 2 prefill + 2 decode (hand-over after the first token, decode instances balance among themselves);
- adaptive: starts as pd, with --pd-adaptive (an instance changes role when prefill or decode is the
  bottleneck).

Per request (orchestrator/bench/stats.py): TTFT = first token received - sent; TPOT = (last message -
first token) / (tokens - 1). SLOs,
calibrated at start on the colocated deployment with no other load: TTFT <= 5 x the median prefill time
(TTFT of a median-length prompt alone) and TPOT <= X x the median decode step (TPOT of one request alone),
for each X of `--slo-tpot-x`: 1.5 (the strict SLO) and 4 (four instances share two cores here, so every
decode step under load is at least twice as slow as alone). GOODPUT = requests that met both SLOs /
seconds from the first send to the last token. The table has P50/P99 TTFT and TPOT, SLO attainment and
goodput per configuration, rate and SLO. The last line is
    goodput_ratio_pd_over_colocated=<best pd goodput over the rates / best colocated goodput>
    goodput_ratio_adaptive_over_colocated=<the same for adaptive>
at the strict SLO (best = the rate at which that configuration's goodput is highest), then the same for
each other X, named ..._tpot<X>x.

This machine is shared and noisy (2 cores for 4 instances): compare configurations within one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from dataclasses import dataclass

import ray

from benchmarks.serving_load import at_rate, deploy, replay, workload
from instance.model.loader import load_tokenizer
from orchestrator.bench.replay import PromptSource
from orchestrator.bench.schedule import PlannedRequest
from orchestrator.bench.stats import RequestRecord, Slo, summarize

FIRST_ROW = 1000
CONFIGS = {
    "colocated": dict(),
    "pd": dict(prefill_instances=2, decode_instances=2),
    "adaptive": dict(prefill_instances=2, decode_instances=2, pd=dict(adaptive=True, cooldown_s=5.0)),
}


@dataclass
class Row:
    config: str
    rate: float
    slo_tpot_x: float
    ttft_p50: float      # seconds
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    attained: float
    goodput: float
    errors: int


def summarize_row(config: str, rate: float, x: float, records: list[RequestRecord], slo: Slo) -> Row:
    s = summarize(records, slo)
    nan = float("nan")
    return Row(config, rate, x, s.ttft.p50 / 1e3 if s.ttft else nan, s.ttft.p99 / 1e3 if s.ttft else nan,
               s.tpot.p50 / 1e3 if s.tpot else nan, s.tpot.p99 / 1e3 if s.tpot else nan, s.slo_attained, s.goodput,
               s.requests - s.completed)


def calibrate(addr: str, prompts: PromptSource, prompt_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """(median prefill time, median decode step), in seconds, of requests alone on the deployment."""
    prefill, step = [], []
    for i in range(repeats):
        alone = summarize(replay(addr, [PlannedRequest(i, 0.0, prompt_tokens, 1)], prompts), Slo())
        prefill.append(alone.ttft.p50 / 1e3)
        decode = summarize(replay(addr, [PlannedRequest(i, 0.0, 16, 32)], prompts), Slo())
        step.append(decode.tpot.p50 / 1e3)
    return statistics.median(prefill), statistics.median(step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="requests per second")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--slo-tpot-x", type=float, nargs="+", default=[1.5, 4.0],
                        help="TPOT SLOs, as multiples of the decode step alone")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--max-prompt", type=int, default=768)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = workload("azure-conv", FIRST_ROW, args.requests, args.max_prompt, args.max_output)
    lengths = [r.prompt_tokens for r in rows]
    prompts = PromptSource(load_tokenizer(args.model), max(lengths), seed=0)
    print(f"pd: {args.model}, 4 instances, {len(rows)} requests of azure-conv rows {FIRST_ROW}.., prompt "
          f"mean {statistics.mean(lengths):.0f} / median {statistics.median(lengths):.0f} tokens, output mean "
          f"{statistics.mean(r.output_tokens for r in rows):.0f} tokens; rates {args.rates}/s", flush=True)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), namespace="tidal-bench", include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    median_prompt = sorted(lengths)[len(lengths) // 2]
    table: list[Row] = []
    slo_ttft = prefill = step = None
    try:
        for name in args.configs:
            d = deploy(f"bench-pd-{name}", 4, dict(model=args.model, max_model_len=1024, kv_cache_gib=0.25),
                       **CONFIGS[name])
            addr = f"127.0.0.1:{d.port}"
            try:
                if slo_ttft is None:
                    prefill, step = calibrate(addr, prompts, median_prompt)
                    slo_ttft = 5 * prefill
                    print(f"SLOs: TTFT <= 5 x {prefill * 1e3:.0f} ms = {slo_ttft * 1e3:.0f} ms (median prefill "
                          f"alone, {median_prompt} tokens); TPOT <= " + " or ".join(
                              f"{x:g} x {step * 1e3:.0f} ms = {x * step * 1e3:.0f} ms" for x in args.slo_tpot_x)
                          + " (decode step alone)", flush=True)
                for rate in args.rates:
                    records = replay(addr, at_rate(rows, rate), prompts)
                    for x in args.slo_tpot_x:
                        row = summarize_row(name, rate, x, records, Slo(slo_ttft * 1e3, x * step * 1e3))
                        table.append(row)
                        print(f"  {name:>9} {rate:5.2f}/s: TTFT p50 {row.ttft_p50:6.2f} s p99 {row.ttft_p99:6.2f} s, "
                              f"TPOT p50 {row.tpot_p50 * 1e3:5.0f} ms p99 {row.tpot_p99 * 1e3:5.0f} ms, "
                              f"SLO(TPOT {x:g}x) met {row.attained:4.0%}, goodput {row.goodput:.3f}/s, "
                              f"errors {row.errors}", flush=True)
            finally:
                d.stop()
    finally:
        ray.shutdown()

    print(f"\n{'config':>10} {'rate/s':>6} {'TPOT SLO':>8} {'TTFT p50 s':>10} {'TTFT p99 s':>10} {'TPOT p50 ms':>11} "
          f"{'TPOT p99 ms':>11} {'SLO met':>7} {'goodput/s':>9} {'errors':>6}")
    for r in table:
        print(f"{r.config:>10} {r.rate:>6.2f} {r.slo_tpot_x:>7g}x {r.ttft_p50:>10.2f} {r.ttft_p99:>10.2f} {r.tpot_p50 * 1e3:>11.0f} "
              f"{r.tpot_p99 * 1e3:>11.0f} {r.attained:>7.0%} {r.goodput:>9.3f} {r.errors:>6}")

    def best(config: str, x: float) -> float:
        return max((r.goodput for r in table if r.config == config and r.slo_tpot_x == x), default=float("nan"))

    def ratios(x: float) -> str:
        base = best("colocated", x)
        return " ".join(f"goodput_ratio_{c}_over_colocated{'' if x == args.slo_tpot_x[0] else f'_tpot{x:g}x'}="
                        f"{best(c, x) / base if base else float('nan'):.2f}" for c in args.configs if c != "colocated")

    print(" ".join(ratios(x) for x in args.slo_tpot_x))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
