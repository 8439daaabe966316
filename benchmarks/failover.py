"""Failover: how long a client's stream stalls when the instance serving it dies, and whether it resumes with
exactly the tokens a fault-free run gives. SmolLM2-135M on CPU, a real deployment (scheduler, two
instances, frontend) on a local Ray, the client over gRPC.

    python -m benchmarks.failover [--contexts 256 512 1024 2048] [--repeats 4] [--kill sigkill|ray]
                                  [--background 2] [--model smollm2-135m]

Setup: `Deployment` with 2 instances, --restart-dead-instances on (each trial kills one), auto-migration off
(nothing but the failover moves a request), max_model_len 2304, 0.4 GiB of fp32 KV per instance (582 blocks
of 16 tokens: a 2048-token context and the background requests fit), one CPU each.

For each context C and repeat r: one request whose prompt is C - WARM_TOKENS tokens (`synthetic_prompt`, seed
r), MAX_TOKENS output tokens, EOS ignored; even repeats greedy, odd repeats seeded sampling (temperature 0.8,
top-p 0.95, seed r). `--background` short requests (64-token prompts, greedy, cancelled once the measured
request ends) run beside it so the instances are serving other work, as they would be in production.
1. Fault-free run of the request alone: its tokens (the reference) and its TTFT (send -> first token), which is
   roughly what re-prefilling a C-token context costs on an idle instance.
2. Faulty run: the background requests start, then the request; once the client has received WARM_TOKENS
   tokens (the context is then C tokens), the instance that produced them is killed (`--kill sigkill`:
   SIGKILL of its worker process, seen by Ray as a crash; `--kill ray`: `ray.kill` of the actor).
   FAILOVER = client receive time of the first token from another instance - time of the kill. It covers
   death detection (Ray -> scheduler -> frontend), dispatch, re-prefill of prompt + streamed tokens, and
   the first decode step on the new instance.
   The stream must have contiguous seq numbers and exactly the reference tokens ("identical").
3. The killed instance is replaced (--restart-dead-instances); the next trial waits until it serves again.

The table gives, per context, the median FAILOVER, the median fault-free TTFT, and how many requests were
identical. The last line is
    failover_ms_256=<median> ... failover_ms_2048=<median> identical_fraction=<identical / trials>
This machine is shared and noisy (2 cores, other people's tests): compare the columns of one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import ray

from orchestrator.bench.traces import synthetic_prompt
from instance.config import EngineConfig
from instance.model.loader import load_tokenizer
from orchestrator.bench.stats import median
from orchestrator.config import ServeConfig
from orchestrator.deployment import Deployment
from tidal.v1 import generation_pb2, generation_pb2_grpc

WARM_TOKENS = 8
MAX_TOKENS = 40
BACKGROUND_PROMPT = 64
BACKGROUND_TOKENS = 2000           # cancelled once the measured request ends
STREAM_TIMEOUT_S = 600.0
RESTART_TIMEOUT_S = 300.0


@dataclass
class Trial:
    context: int
    repeat: int
    seeded: bool
    ttft_ms: float          # fault-free, request alone
    failover_ms: float      # kill -> first token from another instance
    victim: str
    resumed_on: str
    identical: bool


def make_request(ids: list[int], max_tokens: int, seeded: bool, seed: int, rid: str
                 ) -> generation_pb2.GenerateRequest:
    sampling = generation_pb2.SamplingParams(temperature=0.8 if seeded else 0.0, ignore_eos=True)
    if seeded:
        sampling.top_p = 0.95
    req = generation_pb2.GenerateRequest(sampling=sampling, max_tokens=max_tokens, request_id=rid)
    req.token_ids.ids.extend(ids)
    if seeded:
        req.seed = seed
    return req


def reference_run(gen, req) -> tuple[list[int], float]:
    """(tokens, TTFT in ms) of an undisturbed run."""
    sent = time.monotonic()
    ttft, tokens = None, []
    for chunk in gen.Generate(req, timeout=STREAM_TIMEOUT_S):
        if ttft is None:
            ttft = (time.monotonic() - sent) * 1e3
        tokens.extend(chunk.token_ids)
    return tokens, ttft


def instances(d: Deployment) -> dict:
    return {v.instance_id: v for v in d.scheduler.list_instances().result()}


def wait_all_serving(d: Deployment, n: int) -> None:
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while True:
        views = instances(d)
        if len(views) == n and all(v.state == "serving" for v in views.values()):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"instances did not all serve again: {[(i, v.state) for i, v in views.items()]}")
        time.sleep(0.2)


def kill(d: Deployment, instance_id: str, how: str) -> float:
    """Kill the instance; returns the monotonic time of the kill."""
    view = instances(d)[instance_id]
    if how == "sigkill":
        pid = view.info.pid
        at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
    else:
        at = time.monotonic()
        view.client.kill()
    return at


class Background:
    """`n` greedy requests streaming meanwhile; `stop` cancels them."""

    def __init__(self, gen, n: int, tokenizer, tag: str):
        self.errors: list[BaseException] = []
        self.calls = [gen.Generate(make_request(synthetic_prompt(tokenizer, BACKGROUND_PROMPT, seed=1000 + i),
                                                BACKGROUND_TOKENS, False, 0, f"bg-{tag}-{i}"),
                                   timeout=STREAM_TIMEOUT_S) for i in range(n)]
        self.threads = [threading.Thread(target=self._drain, args=(c,), daemon=True) for c in self.calls]
        for t in self.threads:
            t.start()

    def _drain(self, call) -> None:
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(e)

    def stop(self) -> None:
        for c in self.calls:
            c.cancel()
        for t in self.threads:
            t.join(30)
        if self.errors:
            logging.warning("background requests failed: %s", self.errors)


def faulty_run(d: Deployment, gen, req, how: str) -> tuple[list[int], list[int], float, str, str]:
    """(tokens, seqs, failover ms, victim, resumed_on) of a run whose instance is killed mid-stream."""
    tokens, seqs = [], []
    killed_at = victim = resumed_on = None
    failover_ms = float("nan")
    for chunk in gen.Generate(req, timeout=STREAM_TIMEOUT_S):
        tokens.extend(chunk.token_ids)
        seqs.append(chunk.seq)
        if killed_at is None and len(tokens) >= WARM_TOKENS:
            victim = chunk.instance_id
            killed_at = kill(d, victim, how)
        elif killed_at is not None and resumed_on is None and chunk.instance_id != victim:
            failover_ms = (time.monotonic() - killed_at) * 1e3
            resumed_on = chunk.instance_id
    return tokens, seqs, failover_ms, victim, resumed_on


def run_trial(d: Deployment, gen, tokenizer, context: int, repeat: int, how: str, n_background: int) -> Trial:
    seeded = repeat % 2 == 1
    ids = synthetic_prompt(tokenizer, context - WARM_TOKENS, seed=repeat)
    ref_tokens, ttft = reference_run(gen, make_request(ids, MAX_TOKENS, seeded, repeat, f"ref-{context}-{repeat}"))
    others = Background(gen, n_background, tokenizer, f"{context}-{repeat}")
    try:
        time.sleep(0.5)                                  # let them be admitted
        tokens, seqs, failover_ms, victim, resumed_on = faulty_run(
            d, gen, make_request(ids, MAX_TOKENS, seeded, repeat, f"fo-{context}-{repeat}"), how)
    finally:
        others.stop()
    identical = tokens == ref_tokens and seqs == list(range(len(seqs)))
    trial = Trial(context, repeat, seeded, ttft, failover_ms, victim, resumed_on or "-", identical)
    print(f"  C={context:5d} r={repeat} {'seeded' if seeded else 'greedy'}: killed {victim}, resumed on "
          f"{trial.resumed_on} after {failover_ms:7.0f} ms (fault-free TTFT {ttft:6.0f} ms), "
          f"{'identical' if identical else 'DIFFERENT'}", flush=True)
    wait_all_serving(d, 2)
    return trial




def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--kill", choices=["sigkill", "ray"], default="sigkill")
    parser.add_argument("--background", type=int, default=2, help="other requests running meanwhile")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args(argv)
    if max(args.contexts) + MAX_TOKENS > 2304 or min(args.contexts) <= WARM_TOKENS:
        parser.error(f"contexts must be in ({WARM_TOKENS}, {2304 - MAX_TOKENS}]")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = ServeConfig(engine=EngineConfig(model=args.model, max_model_len=2304, kv_cache_gib=0.4),
                      instances=2, host="127.0.0.1", port=0, http_port=0, deployment="bench-failover",
                      namespace="tidal-bench", restart_dead_instances=True, rebalance=dict(auto=False),
                      grace_period_s=2.0)
    tokenizer = load_tokenizer(args.model)
    # the instances' logs (a restart after every kill) stay in Ray's log files, out of the table
    ray.init(num_cpus=max(2, os.cpu_count() or 1), namespace=cfg.namespace, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    d = Deployment(cfg)
    port = d.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    gen = generation_pb2_grpc.GenerationServiceStub(channel)
    trials: list[Trial] = []
    try:
        print(f"failover: {args.model}, 2 instances, kill={args.kill}, background={args.background}, "
              f"contexts {args.contexts}, {args.repeats} repeats", flush=True)
        for repeat in range(args.repeats):
            for context in args.contexts:
                trials.append(run_trial(d, gen, tokenizer, context, repeat, args.kill, args.background))
    finally:
        channel.close()
        d.stop()
        ray.shutdown()

    print(f"\n{'context':>8} {'failover ms':>12} {'fault-free TTFT ms':>19} {'failover - TTFT':>16} "
          f"{'identical':>10}")
    for c in args.contexts:
        ts = [t for t in trials if t.context == c]
        fo, ttft = median(t.failover_ms for t in ts), median(t.ttft_ms for t in ts)
        print(f"{c:>8} {fo:>12.0f} {ttft:>19.0f} {fo - ttft:>16.0f} {sum(t.identical for t in ts):>6}/{len(ts)}")
    same = sum(t.identical for t in trials)
    figures = " ".join(f"failover_ms_{c}={median(t.failover_ms for t in trials if t.context == c):.0f}"
                       for c in args.contexts)
    print(f"{figures} identical_fraction={same / len(trials):.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
