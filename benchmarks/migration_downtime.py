"""Downtime of a live migration against a blocking copy and against recompute, and what a migration costs
the source's other requests. SmolLM2-135M on CPU, two InstanceActors on a local Ray.

    python -m benchmarks.migration_downtime [--contexts 256 1024 2048 4096] [--repeats 3] [--model smollm2-135m]
                                            [--backend native|vllm]

Setup: instance A runs the default MigrationConfig (multi-stage pre-copy), instance B runs
MigrationConfig(max_stages=0) (no pre-copy: every block is copied while the request is out of the batch).
The source's config drives the protocol, so a move out of A is (a) and a move out of B is (b). Both have
engine config `ENGINE` (max_model_len 4608, 0.6 GiB of fp32 KV = 873 blocks of 16 tokens, room for a
4096-token context, ~190 MB of KV, twice over) and one torch thread each.

Downtime. For each context C and each repeat, one request with a C-token prompt (`synthetic_prompt`, the
same prompt in every repeat), greedy, EOS ignored, `MAX_TOKENS` output tokens so it decodes throughout, is
added to one instance (A in even repeats, B in odd ones, so (a) and (b) alternate which goes first). Once it
has produced `WARM_TOKENS` tokens there it is moved to the other instance, once it has produced
`WARM_TOKENS` more there it is moved back, and once it has produced `WARM_TOKENS` more it is recomputed:
(a) multi-stage migration, `A.migrate_out` (pre-copy stages while it decodes, then the last stage);
(b) blocking copy, `B.migrate_out` (suspend, copy every block, commit);
(c) recompute: abort on the source, then add a new request to the other instance whose prompt is the
    original prompt plus every token generated so far (same sampling, max_tokens reduced by that many).
    This includes the driver reading the stream back (abort round trip, a 20 ms settle) before the add.
DOWNTIME = produced_at of the first chunk produced on the destination - produced_at of the last chunk
produced on the source (TokenChunk.produced_at: time.time() when the step that produced it ended; both
instances share this machine's clock). It includes the normal inter-token gap: with no migration at all
the next token would have come one decode step later (the "step" column: median gap between consecutive
tokens of the request on one instance). The table shows the medians over repeats, and the record's own
downtime_ms (the source's view: from when `suspend` returned, which already includes exporting the last
stage's blocks, until the destination committed).
Correctness: the stream of every request must have contiguous seq numbers and no duplicates, and its
tokens (moved twice) must equal those of an unmigrated greedy run of the same prompt on A.

Step slowdown. Instance A decodes one request with a `--slowdown-context`-token (4096) context plus
`BACKGROUND` (4) short requests (64-token prompts); B holds nothing else. Each of `--slowdown-rounds` (12)
rounds: four fresh background requests are added to A and the round waits until they are past their
prefill and the long request has made one more token (every step from then on is a decode of the same five
requests); a QUIET window of `QUIET_STEPS` (4) steps of A with no migration; then A.migrate_out moves the long
request to B (default config, measured); the background requests are aborted, so that A is idle when B
moves the long request back (not measured). A STEP INTERVAL is the gap between the produced_at of two
consecutive chunks of one background request (one chunk per step: the step time plus the loop's time
between steps, what a user sees as time per output token). Quiet intervals: those that end inside the quiet
window. In-flight intervals: those that end after migrate_out was called and no later than the last step
in which the long request was still in A's batch (the pre-copy phase, including the step or two it waits
for between steps to check and suspend the request; afterwards the batch is smaller). The batch is the same
in both windows. Per round, ratio = mean in-flight interval / mean quiet interval; step_slowdown_pct =
100 * (median over rounds of ratio - 1). The pooled ratio (all in-flight intervals over all quiet ones) is
printed too.

The last line is
    downtime_ratio_4096_vs_256=<(a) downtime at 4096 / at 256> recompute_over_migration_4096=<(c) / (a) at
    4096> step_slowdown_pct=<as above>
(nan where a context was not run). Goals: downtime_ratio_4096_vs_256 <= 1.3 (downtime does not grow with
the context), recompute_over_migration_4096 >= 20, step_slowdown_pct <= 3.

While it measures, the driver only asks the sink how far a request got, never the instances (a call into an
instance takes its GIL between the model's ops and slows its steps).

This machine is shared and noisy (2 cores, other people's tests): everything is a ratio measured in one run,
configurations alternate, and figures are medians over repeats.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from orchestrator.bench.traces import synthetic_prompt
from instance.model.loader import load_tokenizer
from instance.sampling import SamplingParams
from migration.protocol import MigrationRecord, MigrationState
from orchestrator.bench.stats import median
from rpc import Deadlines
from rpc.frontend import FrontendClient
from rpc.instance import InstanceClient

ROOT = Path(__file__).resolve().parents[1]
ENGINE = dict(kv_cache_gib=0.6, max_model_len=4608)
BLOCKING = dict(max_stages=0)
MAX_TOKENS = 400            # prompt + MAX_TOKENS <= max_model_len for a 4096-token prompt
WARM_TOKENS = 4             # tokens a request produces on an instance before it is moved on
BACKGROUND = 4
BACKGROUND_PROMPT = 64
QUIET_STEPS = 4             # steps of A in each quiet window
SETTLE_S = 0.02             # (c): how long the stream must stay unchanged after the abort
POLL_S = 0.05               # how often the driver asks the sink how far a request got
START_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 120.0      # one migration, one abort, one add
TOKENS_TIMEOUT_S = 600.0    # a 4096-token prefill takes ~1 min on one busy core
DEADLINES = Deadlines(call_s=CALL_TIMEOUT_S, startup_s=START_TIMEOUT_S, migration_s=CALL_TIMEOUT_S)


class Sink:
    """Collects chunks per request, like a frontend stream. Ray may run an async actor's calls out of order,
    so chunks are handed out ordered by seq."""

    def __init__(self):
        self.chunks: dict[str, list] = {}

    async def push_chunks(self, chunks) -> None:
        for c in chunks:
            self.chunks.setdefault(c.request_id, []).append(c)

    async def request_moved(self, request_id, instance) -> None:
        pass

    async def ping(self) -> bool:
        return True

    async def get(self, request_id) -> list:
        return sorted(self.chunks.get(request_id, []), key=lambda c: c.seq)

    async def count(self, request_id) -> int:
        return len(self.chunks.get(request_id, []))

    async def num_tokens(self, request_id) -> int:
        return sum(len(c.token_ids) for c in self.chunks.get(request_id, []))


# ----- helpers ----------------------------------------------------------------------------------------------

def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def call(ref, timeout: float = CALL_TIMEOUT_S):
    """A read of the sink actor (the benchmark's own)."""
    return ray.get(ref, timeout=timeout)


@dataclass
class SinkRef:
    actor: object               # the Sink actor, read by the driver
    client: FrontendClient      # what instances push its chunks through, as through a frontend's


def wait_until(predicate, what: str, timeout: float, interval: float = 0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {timeout:.0f} s")
        time.sleep(interval)


def streamed(sink, rid: str) -> int:
    return call(sink.actor.num_tokens.remote(rid))


def wait_streamed(sink, rid: str, n: int, interval: float = POLL_S) -> int:
    """Until the sink has received n tokens of rid. The sink is asked, not the instance: a call into an
    instance takes its GIL between the model's ops and would slow the steps being measured."""
    return wait_until(lambda: (k := streamed(sink, rid)) >= n and k, f"{rid}: {n} output tokens",
                      TOKENS_TIMEOUT_S, interval)


def stream(sink, rid: str) -> list:
    """The request's chunks so far, checked: contiguous seq from 0, no duplicates."""
    chunks = call(sink.actor.get.remote(rid))
    seqs = [c.seq for c in chunks]
    if seqs != list(range(len(seqs))):
        raise AssertionError(f"{rid}: the stream's seq numbers are not 0..n-1 without duplicates: {seqs}")
    return chunks


def settled_stream(sink, rid: str, min_tokens: int) -> list:
    """The stream of a request that was just aborted, once every chunk it produced has arrived."""
    def ready():
        chunks = call(sink.actor.get.remote(rid))
        if [c.seq for c in chunks] != list(range(len(chunks))) or sum(len(c.token_ids) for c in chunks) < min_tokens:
            return None
        time.sleep(SETTLE_S)
        return chunks if call(sink.actor.count.remote(rid)) == len(chunks) else None

    wait_until(ready, f"{rid}: stream after abort", 30.0)
    return stream(sink, rid)


def tokens(chunks) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def segments(chunks) -> list[tuple[str, list]]:
    """Runs of consecutive chunks produced on one instance: [(instance id, chunks), ...]."""
    runs: list[tuple[str, list]] = []
    for c in chunks:
        if runs and runs[-1][0] == c.instance_id:
            runs[-1][1].append(c)
        else:
            runs.append((c.instance_id, [c]))
    return runs




# ----- the two instances ------------------------------------------------------------------------------------

@dataclass
class Instance:
    name: str
    client: InstanceClient
    method: str         # what a move out of this instance is: "a" (multi-stage) or "b" (blocking)


def start_instance(name: str, model: str, migration: dict, backend: str = "native") -> InstanceClient:
    instance = InstanceClient.create(name, {"model": model, **ENGINE, "backend": backend}, migration, DEADLINES)
    instance.start().result()
    return instance


class MigrationFailed(RuntimeError):
    """A migration did not commit (the request is still on its source)."""


def migrate(src: Instance, rid: str, dst: Instance) -> MigrationRecord:
    record = src.client.migrate_out(rid, dst.client).result()
    if record.state is not MigrationState.COMMITTED:
        raise MigrationFailed(f"migration {src.name} -> {dst.name} of {rid} did not commit: {record.state.value} "
                           f"({record.reason})")
    return record


# ----- downtime ---------------------------------------------------------------------------------------------

@dataclass
class Move:
    method: str                  # a | b | c
    context: int
    downtime_ms: float
    record: MigrationRecord | None = None
    step_ms: float = math.nan    # median gap between consecutive tokens of the request on one instance
    before_ms: float = math.nan  # last token on the source -> the record's downtime starts (approx., `split`)
    after_ms: float = math.nan   # committed -> first token on the destination (approximate)


def run_trial(rid: str, context: int, repeat: int, prompt: list[int], a: Instance, b: Instance,
              sink) -> tuple[list[Move], list[int]]:
    """One request moved first -> second (migration), second -> first (migration), first -> second
    (recompute). Returns the three moves and the request's tokens up to its abort."""
    first, second = (a, b) if repeat % 2 == 0 else (b, a)
    first.client.add_request(rid, prompt, greedy(MAX_TOKENS), 0, sink.client).result()
    wait_streamed(sink, rid, WARM_TOKENS)
    records = [migrate(first, rid, second)]
    wait_streamed(sink, rid, streamed(sink, rid) + WARM_TOKENS)
    records.append(migrate(second, rid, first))
    n0 = wait_streamed(sink, rid, streamed(sink, rid) + WARM_TOKENS)

    # (c) recompute: the stream so far becomes the prompt of a new request on the other instance
    first.client.abort_request(rid).result()
    chunks = settled_stream(sink, rid, n0)
    generated = tokens(chunks)
    rid_re = f"{rid}-recompute"
    second.client.add_request(rid_re, prompt + generated, greedy(MAX_TOKENS - len(generated)), 0, sink.client).result()
    wait_until(lambda: call(sink.actor.count.remote(rid_re)) > 0, f"{rid_re}: first token", TOKENS_TIMEOUT_S, POLL_S)
    second.client.abort_request(rid_re).result()
    first_recomputed = stream(sink, rid_re)[0]

    runs = segments(chunks)
    if [name for name, _ in runs] != [first.name, second.name, first.name]:
        raise AssertionError(f"{rid}: expected the stream on {first.name}, {second.name}, {first.name}; "
                             f"got {[name for name, _ in runs]}")
    gaps = [y.produced_at - x.produced_at for _, run in runs for x, y in zip(run, run[1:])]
    step_ms = 1000 * median(gaps)
    moves = []
    for (src, record), (_, before), (_, after) in zip(((first, records[0]), (second, records[1])), runs, runs[1:]):
        moves.append(Move(src.method, context, 1000 * (after[0].produced_at - before[-1].produced_at), record,
                          step_ms, *split(record, before[-1].produced_at, after[0].produced_at)))
    moves.append(Move("c", context, 1000 * (first_recomputed.produced_at - runs[-1][1][-1].produced_at),
                      step_ms=step_ms))
    return moves, generated


def split(record: MigrationRecord, last_on_src: float, first_on_dst: float) -> tuple[float, float]:
    """(last source token -> start of the record's downtime, commit -> first destination token) in ms. The
    record keeps only its end (after the source freed its blocks, between two steps of an otherwise idle
    source: ~1 ms after the commit) and its downtime, so commit ~ ended_at and its downtime starts at
    ended_at - downtime. migrate_out starts that clock when `suspend` returns, i.e. after the source has
    exported the last stage's blocks, so the first part includes that export."""
    commit = record.ended_at
    suspend = commit - record.downtime_ms / 1000
    return 1000 * (suspend - last_on_src), 1000 * (first_on_dst - commit)


def reference(instance: Instance, sink, prompt: list[int], n: int, context: int) -> list[int]:
    """The tokens of an unmigrated greedy run of `prompt`."""
    rid = f"ctx{context}-reference"
    instance.client.add_request(rid, prompt, greedy(n), 0, sink.client).result()
    wait_until(lambda: (c := call(sink.actor.get.remote(rid))) and c[-1].finish_reason is not None
               and len(c) == c[-1].seq + 1, f"{rid}: finished", TOKENS_TIMEOUT_S, POLL_S)
    return tokens(stream(sink, rid))


def describe(move: Move) -> str:
    r = move.record
    if r is None:
        return f"{move.method}: downtime {move.downtime_ms:8.1f} ms (recompute)"
    return (f"{move.method}: downtime {move.downtime_ms:8.1f} ms  record {r.downtime_ms:7.1f} ms  "
            f"{r.src}->{r.dst} stages {r.stage} blocks {r.blocks_copied} per stage {r.stage_blocks}  "
            f"step {move.step_ms:.0f} ms  last src->record start {move.before_ms:.0f} ms  "
            f"commit->first dst {move.after_ms:.0f} ms")


def check_clean(*instances: Instance) -> None:
    """Every block free and no request left once everything was aborted; a warning if not (a leak)."""
    for inst in instances:
        inst.client.check_integrity().result()
    try:
        wait_until(lambda: all((l := i.client.get_status().result().load).free_blocks == l.total_blocks
                               and l.num_running + l.num_waiting + l.num_suspended == 0 for i in instances),
                   "instances idle", 10.0, POLL_S)
    except TimeoutError:
        for inst in instances:
            print(f"WARNING: instance {inst.name} holds blocks or requests after everything ended: "
                  f"{inst.client.get_status().result().load}", flush=True)


def downtimes(contexts: list[int], repeats: int, tokenizer, a: Instance, b: Instance, sink) -> list[Move]:
    moves: list[Move] = []
    for context in contexts:
        prompt = synthetic_prompt(tokenizer, context, seed=context)
        streams = []
        for repeat in range(repeats):
            for attempt in range(3):
                rid = f"ctx{context}-r{repeat}-{attempt}"
                try:
                    trial, generated = run_trial(rid, context, repeat, prompt, a, b, sink)
                    break
                except MigrationFailed as e:
                    print(f"context {context} repeat {repeat}: {e}; running the trial again", flush=True)
                    for inst in (a, b):
                        inst.client.abort_request(rid).result()
            else:
                raise RuntimeError(f"context {context} repeat {repeat}: three trials failed")
            streams.append(generated)
            moves += trial
            print(f"context {context} repeat {repeat}:", flush=True)
            for m in trial:
                print("    " + describe(m), flush=True)
        expected = reference(a, sink, prompt, max(len(s) for s in streams), context)
        for repeat, got in enumerate(streams):
            if got != expected[:len(got)]:
                at = next(i for i, (x, y) in enumerate(zip(got, expected)) if x != y)
                raise AssertionError(f"context {context} repeat {repeat}: the migrated stream differs from the "
                                     f"unmigrated one at output token {at} of {len(got)}")
        print(f"context {context}: every migrated stream equals the unmigrated greedy run "
              f"({', '.join(str(len(s)) for s in streams)} tokens)", flush=True)
        check_clean(a, b)
    return moves


def downtime_table(contexts: list[int], moves: list[Move]) -> dict[tuple[int, str], float]:
    header = (f"{'context':>7} | {'(a) ms':>8} {'record':>7} {'stages':>6} {'blocks':>6} | {'(b) ms':>8} "
              f"{'record':>7} {'blocks':>6} | {'(c) ms':>9} | {'step ms':>7} | {'(a)-step':>8} {'(b)-step':>8}")
    print()
    print("downtime, medians over repeats: (a) multi-stage migration, (b) blocking copy, (c) recompute")
    print(header)
    print("-" * len(header))
    medians: dict[tuple[int, str], float] = {}
    for context in contexts:
        of = {m: [x for x in moves if x.context == context and x.method == m] for m in "abc"}
        for m in "abc":
            medians[context, m] = median(x.downtime_ms for x in of[m])
        step = median(x.step_ms for x in of["c"])

        def rec(m, field):
            return median(getattr(x.record, field) for x in of[m])

        print(f"{context:>7} | {medians[context, 'a']:8.1f} {rec('a', 'downtime_ms'):7.1f} "
              f"{rec('a', 'stage'):6.0f} {rec('a', 'blocks_copied'):6.0f} | {medians[context, 'b']:8.1f} "
              f"{rec('b', 'downtime_ms'):7.1f} {rec('b', 'blocks_copied'):6.0f} | {medians[context, 'c']:9.1f} | "
              f"{step:7.1f} | {medians[context, 'a'] - step:8.1f} {medians[context, 'b'] - step:8.1f}")
    print("record = the source's own downtime_ms (suspend returned, after exporting the last stage -> committed); "
          "step = median gap between two tokens on one instance; x-step = downtime beyond that gap")
    return medians


# ----- step slowdown ------------------------------------------------------------------------------------------

def step_slowdown(context: int, rounds: int, tokenizer, a: Instance, b: Instance, sink) -> float:
    """See the module docstring. Returns step_slowdown_pct."""
    big = f"slowdown-{context}"
    a.client.add_request(big, synthetic_prompt(tokenizer, context, seed=context + 1),
                                    greedy(MAX_TOKENS), 0, sink.client).result()
    prompts = [synthetic_prompt(tokenizer, BACKGROUND_PROMPT, seed=1000 + i) for i in range(BACKGROUND)]
    rounds_done = []        # (background request whose steps we time, quiet window, record)
    try:
        for k in range(rounds):
            # fresh background requests each round: A must be idle when the long request comes back (below)
            background = [f"background-{k}-{i}" for i in range(BACKGROUND)]
            for rid, prompt in zip(background, prompts):
                a.client.add_request(rid, prompt, greedy(4000), 0, sink.client).result()
            for rid in background:
                wait_streamed(sink, rid, 2)           # past their prefill: from now on every step is a decode
            wait_streamed(sink, big, streamed(sink, big) + 1)
            q0 = time.time()
            wait_streamed(sink, background[0], streamed(sink, background[0]) + QUIET_STEPS, 0.25)
            quiet = (q0, time.time())
            try:
                record = migrate(a, big, b)
            except MigrationFailed as e:
                print(f"round {k}: skipped, {e}", flush=True)
                record = None
            for rid in background:
                a.client.abort_request(rid).result()
            if record is None:
                continue
            rounds_done.append((background[0], quiet, record))
            wait_streamed(sink, big, streamed(sink, big) + 2)
            # back into an idle A: a busy destination's first reserve waits for its step, and the reaper may
            # then drop the migration and leak its blocks (see the report)
            for attempt in range(3):
                try:
                    migrate(b, big, a)
                    break
                except MigrationFailed as e:
                    print(f"round {k}: moving back failed ({e}), retrying", flush=True)
            else:
                raise RuntimeError("could not move the long request back to A")
        runs = segments(stream(sink, big))
    finally:
        for inst in (a, b):
            inst.client.abort_request(big).result()
    check_clean(a, b)

    print()
    print(f"source step interval, {BACKGROUND} background requests + one {context}-token request decoding on A:")
    print(f"{'round':>5} | {'quiet ms':>8} {'n':>3} | {'in-flight ms':>12} {'n':>3} | {'ratio':>6} | "
          f"{'stages':>6} {'blocks':>6} {'downtime':>8}")
    ratios, quiet_all, flight_all = [], [], []
    for k, (rid, (q0, q1), record) in enumerate(rounds_done):
        name, run = runs[2 * k]          # the long request's runs alternate A, B, A, ...; move k ended run 2k
        assert name == a.name, [r[0] for r in runs]
        last_on_src = run[-1].produced_at
        times = [c.produced_at for c in stream(sink, rid)]
        intervals = list(zip(times, times[1:]))
        quiet = [y - x for x, y in intervals if q0 < y <= q1]
        flight = [y - x for x, y in intervals if record.started_at < y <= last_on_src]
        quiet_all += quiet
        flight_all += flight
        ratio = statistics.mean(flight) / statistics.mean(quiet) if quiet and flight else math.nan
        if not math.isnan(ratio):
            ratios.append(ratio)
        print(f"{k:>5} | {1000 * statistics.mean(quiet) if quiet else math.nan:8.1f} {len(quiet):>3} | "
              f"{1000 * statistics.mean(flight) if flight else math.nan:12.1f} {len(flight):>3} | {ratio:6.3f} | "
              f"{record.stage:>6} {record.blocks_copied:>6} {record.downtime_ms:8.1f}")
    pooled = statistics.mean(flight_all) / statistics.mean(quiet_all) if quiet_all and flight_all else math.nan
    slowdown = 100 * (median(ratios) - 1) if ratios else math.nan
    print(f"median ratio over {len(ratios)} of {rounds} rounds: {median(ratios):.3f} (slowdown {slowdown:.1f} %); "
          f"pooled means: {1000 * statistics.mean(flight_all) if flight_all else math.nan:.1f} ms in flight / "
          f"{1000 * statistics.mean(quiet_all) if quiet_all else math.nan:.1f} ms quiet = {pooled:.3f}")
    return slowdown


# ----- main -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", choices=["native", "vllm"], default="native",
                        help="engine of both instances (vllm: blocks of 32 tokens)")
    parser.add_argument("--slowdown-context", type=int, default=4096)
    parser.add_argument("--slowdown-rounds", type=int, default=12, help="0: skip the step-slowdown measurement")
    args = parser.parse_args(argv)
    if max(args.contexts + [args.slowdown_context]) + MAX_TOKENS > ENGINE["max_model_len"]:
        parser.error(f"contexts: at most {ENGINE['max_model_len'] - MAX_TOKENS} tokens (max_model_len "
                     f"{ENGINE['max_model_len']} minus {MAX_TOKENS} output tokens)")

    torch.set_num_threads(1)
    # the Sink must be importable by Ray's workers under its module name, not as __main__
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    sink_class = importlib.import_module("benchmarks.migration_downtime").Sink
    # address="local": a cluster of our own, even where another one on this machine is the "current" one
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    sink_actor = None
    instances: list[InstanceClient] = []
    try:
        tokenizer = load_tokenizer(args.model)
        sink_actor = ray.remote(sink_class).remote()
        sink = SinkRef(sink_actor, FrontendClient("sink", sink_actor, DEADLINES))
        a = Instance("A", start_instance("A", args.model, {}, args.backend), "a")
        instances.append(a.client)
        b = Instance("B", start_instance("B", args.model, BLOCKING, args.backend), "b")
        instances.append(b.client)
        print(f"model {args.model}, backend {args.backend}, engine {ENGINE}, A: default MigrationConfig, B: {BLOCKING}; "
              f"contexts {args.contexts}, {args.repeats} repeats", flush=True)

        moves = downtimes(args.contexts, args.repeats, tokenizer, a, b, sink)
        slowdown = (step_slowdown(args.slowdown_context, args.slowdown_rounds, tokenizer, a, b, sink)
                    if args.slowdown_rounds else math.nan)
        medians = downtime_table(args.contexts, moves)
    finally:
        for instance in instances:
            instance.kill()
        if sink_actor is not None:
            ray.kill(sink_actor)
        ray.shutdown()

    def at(context, method):
        return medians.get((context, method), math.nan)

    print()
    print(f"goals: downtime_ratio_4096_vs_256 <= 1.3, recompute_over_migration_4096 >= 20, step_slowdown_pct <= 3")
    print(f"downtime_ratio_4096_vs_256={at(4096, 'a') / at(256, 'a'):.2f} "
          f"recompute_over_migration_4096={at(4096, 'c') / at(4096, 'a'):.1f} step_slowdown_pct={slowdown:.1f}")


if __name__ == "__main__":
    sys.exit(main())
