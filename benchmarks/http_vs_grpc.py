"""gRPC against the OpenAI HTTP API on the same workload and deployment: what each path costs a client.

One deployment (local Ray, one instance) serves the same requests — a stretch of the Azure LLM conversation
trace at a fixed mean rate, lengths scaled to fit a CPU model, greedy with EOS ignored — with the `tidal bench
replay` engine, alternately over gRPC (`Generate` streams) and over HTTP (streamed `/v1/completions`), `--rounds`
times each. Reports TTFT and inter-token latency percentiles per path, and the frontend process's CPU time per
streamed token (user + system, read from /proc before and after each run, less its idle rate). The last line
is HTTP's extra frontend CPU per token over gRPC's, in microseconds.

    python -m benchmarks.http_vs_grpc [--model tiny-llama] [--requests 40] [--rate 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import grpc

from benchmarks.serving_load import at_rate, deploy, workload
from instance.model.loader import load_tokenizer
from orchestrator.bench.replay import Progress, PromptSource, Replay, run_http
from orchestrator.bench.report import format_table
from orchestrator.bench.stats import Slo, summarize

TIMEOUT_S = 600.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process on this machine."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(path: str, d, plan, prompts, model: str) -> tuple[list, float]:
    replay = Replay(plan, prompts, TIMEOUT_S, Progress(len(plan), enabled=False))
    replay.model = model

    async def go():
        if path == "http":
            await run_http(replay, f"http://127.0.0.1:{d.http_port}", 30.0)
        else:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{d.port}") as channel:
                await replay.run(channel)

    pid = d.frontend.pid().result()
    before, t0 = cpu_s(pid), time.monotonic()
    asyncio.run(go())
    return replay.records, cpu_s(pid) - before - idle_cpu_per_s(d) * (time.monotonic() - t0)


_IDLE: dict[int, float] = {}


def idle_cpu_per_s(d, seconds: float = 5.0) -> float:
    """The frontend's CPU per second with no request (the instance table pushed every load_interval_s), measured
    once and subtracted from each run, so what is left is what the requests cost."""
    pid = d.frontend.pid().result()
    if pid not in _IDLE:
        before = cpu_s(pid)
        time.sleep(seconds)
        _IDLE[pid] = (cpu_s(pid) - before) / seconds
    return _IDLE[pid]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=4.0, help="mean requests per second")
    ap.add_argument("--rounds", type=int, default=2, help="runs per path, alternating grpc, http, grpc, ...")
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=768)
    args = ap.parse_args()

    import ray

    rows = workload("azure-conv", 0, args.requests, args.max_prompt, args.max_output)
    plan = at_rate(rows, args.rate)
    prompts = PromptSource(load_tokenizer(args.model), max(p.prompt_tokens for p in plan), 0)
    engine = dict(model=args.model, max_model_len=2048, kv_cache_gib=0.5)
    d = deploy("bench-http", 1, engine, rebalance=dict(auto=False))
    try:
        results: dict[str, list] = {"grpc": [], "http": []}
        for _ in range(args.rounds):
            for path in ("grpc", "http"):
                records, cpu = run_once(path, d, plan, prompts, args.model)
                failed = [r for r in records if not r.ok]
                if failed:
                    raise SystemExit(f"{path}: {len(failed)} requests failed, e.g. {failed[0].status}: "
                                     f"{failed[0].error}")
                results[path].append((summarize(records, Slo(None, None)), cpu, sum(r.tokens for r in records)))
    finally:
        d.stop()
        ray.shutdown()

    rows_out, per_token_us = [], {}
    for path, runs in results.items():
        ttft50 = statistics.median(s.ttft.p50 for s, _, _ in runs)
        ttft99 = statistics.median(s.ttft.p99 for s, _, _ in runs)
        itl50 = statistics.median(s.itl.p50 for s, _, _ in runs)
        itl99 = statistics.median(s.itl.p99 for s, _, _ in runs)
        per_token_us[path] = statistics.median(1e6 * cpu / tokens for _, cpu, tokens in runs)
        rows_out.append([path, f"{ttft50:.1f}", f"{ttft99:.1f}", f"{itl50:.1f}", f"{itl99:.1f}",
                         f"{per_token_us[path]:.0f}", str(runs[0][2])])
    print(f"{args.requests} requests of azure-conv at {args.rate:g}/s, {args.model}, 1 instance, "
          f"{args.rounds} runs per path (medians of the runs), load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; frontend CPU net of its idle {1e3 * next(iter(_IDLE.values())):.0f} ms/s")
    print(format_table([("path", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms",
                         "frontend CPU us/token", "tokens"), *rows_out]))
    print(f"HTTP extra frontend CPU per streamed token: {per_token_us['http'] - per_token_us['grpc']:.0f} us")


if __name__ == "__main__":
    main()
