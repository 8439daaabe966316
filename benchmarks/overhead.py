"""What serving through Tidal costs over calling the engine directly.

The same requests — 64 from the Azure LLM conversation trace (../shared/data/azure_llm_2023, see its
SOURCE.md; lengths scaled as in `benchmarks.engine_throughput.trace_workload`), greedy, EOS ignored — are sent
at the same concurrency (a closed loop: a new request starts when one finishes)

  (a) to one `Engine` in this process, stepping it ourselves;
  (b) through `tidal serve` (a subprocess: local Ray, GlobalScheduler, one InstanceActor, gRPC frontend) with
      `tidal.v1.GenerationService.Generate` streams over loopback.

Both get the same torch threads. Runs alternate a, b, a, b to spread the machine's drift over both. Prints
mean and P99 TTFT and end-to-end latency for both, per model; the last line is the end-to-end overhead of (b)
over (a) for smollm2-135m.

    python -m benchmarks.overhead [--models tiny-llama smollm2-135m] [--requests 64] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.engine_throughput import trace_workload
from instance.engine import Engine
from instance.model.loader import load_tokenizer
from instance.sampling import SamplingParams

ENGINE = dict(max_model_len=2048, kv_cache_gib=0.5, max_num_batched_tokens=512)
MAX_PROMPT, MAX_OUTPUT = 384, 64


@dataclass
class Latencies:
    ttft_s: list[float]
    e2e_s: list[float]
    wall_s: float

    def row(self, label: str) -> str:
        return (f"{label:<28} {mean_ms(self.ttft_s):>9.1f} {p99_ms(self.ttft_s):>9.1f} "
                f"{mean_ms(self.e2e_s):>9.1f} {p99_ms(self.e2e_s):>9.1f} {self.wall_s:>8.1f}")


def mean_ms(xs: list[float]) -> float:
    return 1000 * statistics.fmean(xs)


def p99_ms(xs: list[float]) -> float:
    ordered = sorted(xs)
    return 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def merge(runs: list[Latencies]) -> Latencies:
    return Latencies([x for r in runs for x in r.ttft_s], [x for r in runs for x in r.e2e_s],
                     statistics.fmean(r.wall_s for r in runs))


# ----- (a) the engine in this process --------------------------------------------------------------------------

def run_in_process(engine: Engine, prompts: list[list[int]], outputs: list[int], concurrency: int) -> Latencies:
    todo = list(range(len(prompts)))
    submitted: dict[str, float] = {}
    ttft, e2e = [], []
    first_seen: set[str] = set()
    start = time.perf_counter()
    tag = f"{time.monotonic_ns():x}"
    while todo or submitted:
        while todo and len(submitted) < concurrency:
            i = todo.pop(0)
            rid = f"{tag}-{i}"
            engine.add_request(rid, prompt_token_ids=prompts[i],
                               params=SamplingParams(max_tokens=outputs[i], temperature=0.0, ignore_eos=True))
            submitted[rid] = time.perf_counter()
        for out in engine.step():
            now = time.perf_counter()
            if out.new_token_ids and out.request_id not in first_seen:
                first_seen.add(out.request_id)
                ttft.append(now - submitted[out.request_id])
            if out.finished:
                e2e.append(now - submitted.pop(out.request_id))
    return Latencies(ttft, e2e, time.perf_counter() - start)


# ----- (b) through `tidal serve` over gRPC -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tidal serve` with one instance, in its own process group."""

    def __init__(self, model: str, threads: int):
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="tidal-overhead-", suffix=".log", delete=False)
        tidal = str(Path(sys.executable).parent / "tidal")
        args = [tidal, "serve", "--model", model, "--instances", "1", "--host", "127.0.0.1", "--port",
                str(self.port), "--http-port", "0", "--num-cpus-per-instance", str(threads), "--deployment", "overhead",
                "--kv-cache-gib", str(ENGINE["kv_cache_gib"]), "--max-model-len", str(ENGINE["max_model_len"])]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 600
        while "tidal: ready" not in Path(self.log.name).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tidal serve did not start:\n{Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        os.unlink(self.log.name)


async def _run_grpc(addr: str, prompts: list[list[int]], outputs: list[int], concurrency: int) -> Latencies:
    import grpc

    from tidal.v1 import generation_pb2, generation_pb2_grpc

    todo = list(range(len(prompts)))
    ttft, e2e = [], []
    async with grpc.aio.insecure_channel(addr) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)

        async def worker():
            while todo:
                i = todo.pop(0)
                req = generation_pb2.GenerateRequest(
                    token_ids=generation_pb2.TokenIds(ids=prompts[i]), max_tokens=outputs[i],
                    sampling=generation_pb2.SamplingParams(temperature=0.0, ignore_eos=True))
                t0 = time.perf_counter()
                first = None
                async for chunk in stub.Generate(req, timeout=600):
                    if first is None and chunk.token_ids:
                        first = time.perf_counter()
                ttft.append(first - t0)
                e2e.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Latencies(ttft, e2e, time.perf_counter() - start)


def run_grpc(addr: str, prompts, outputs, concurrency: int) -> Latencies:
    return asyncio.run(_run_grpc(addr, prompts, outputs, concurrency))


# ----- the comparison ------------------------------------------------------------------------------------------

def compare(model: str, n: int, concurrency: int, repeats: int, threads: int) -> tuple[Latencies, Latencies, str]:
    torch.set_num_threads(threads)
    work = trace_workload(load_tokenizer(model), n, max_prompt=MAX_PROMPT, max_output=MAX_OUTPUT)
    engine = Engine(model=model, **ENGINE)
    server = Server(model, threads)
    addr = f"127.0.0.1:{server.port}"
    try:
        warm = work.prompts[:concurrency], [4] * concurrency
        run_in_process(engine, *warm, concurrency)
        run_grpc(addr, *warm, concurrency)
        direct, served = [], []
        for _ in range(repeats):
            direct.append(run_in_process(engine, work.prompts, work.output_lens, concurrency))
            served.append(run_grpc(addr, work.prompts, work.output_lens, concurrency))
    finally:
        server.stop()
    return merge(direct), merge(served), work.description


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on both sides")
    args = p.parse_args(argv)
    overhead = {}
    for model in args.models:
        direct, served, description = compare(model, args.requests, args.concurrency, args.repeats, args.threads)
        print(f"\n== {model}: {description}")
        print(f"concurrency {args.concurrency}, {args.repeats} alternating repeats, torch threads {args.threads}")
        print(f"{'':<28} {'TTFT mean':>9} {'TTFT p99':>9} {'E2E mean':>9} {'E2E p99':>9} {'wall s':>8}")
        print(direct.row("(a) engine in-process"))
        print(served.row("(b) tidal serve over gRPC"))
        overhead[model] = 100.0 * (statistics.fmean(served.e2e_s) / statistics.fmean(direct.e2e_s) - 1.0)
        print(f"end-to-end overhead of (b) over (a): {overhead[model]:+.1f}% (mean), "
              f"TTFT {mean_ms(served.ttft_s) - mean_ms(direct.ttft_s):+.1f} ms")
    key = "smollm2-135m" if "smollm2-135m" in overhead else args.models[-1]
    print(f"e2e_overhead_pct_{key.split('-')[0]}={overhead[key]:.1f}")
    return overhead[key]


if __name__ == "__main__":
    main()
