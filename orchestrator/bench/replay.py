"""`tidal bench replay`: send a trace's requests to a deployment as real gRPC streams (or, with --http, as
streamed completions over the OpenAI API), on the trace's clock.

One asyncio loop sends every request at its scheduled time (`schedule`) and reads all streams; each message's
arrival is stamped on one monotonic clock (`stats.RequestRecord`). Prompts are synthetic token ids of the
traced length; sampling is greedy with ignore_eos, so each output is exactly the traced length unless the model's
length limit cuts it. Every stream has a deadline (--timeout); a request the server rejects counts as failed with
its status code; Ctrl-C cancels what is in flight and still reports what finished.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import random
import signal
import sys
import time
import uuid
from pathlib import Path

import grpc

from orchestrator.bench.schedule import PlannedRequest, build_schedule, parse_priority_mix
from orchestrator.bench.stats import CANCELLED, OK, RequestRecord, Slo
from orchestrator.config import default_addr
from orchestrator.security import add_connection_args, client_credentials, client_metadata

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def add_parser(sub) -> None:
    """`tidal bench replay ...` under the CLI's subcommands."""
    bench = sub.add_parser("bench", help="load generators that measure a running deployment")
    kinds = bench.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser(
        "replay", help="replay a request trace over gRPC and report TTFT, TPOT, ITL, end-to-end latency and goodput",
        description="Send a trace's requests as real gRPC streams on the trace's timestamps (or Poisson / gamma "
                    "arrivals), with its prompt and output lengths, and report what clients saw.")
    arg = p.add_argument
    arg("--trace", required=True, metavar="NAME|FILE", help="azure-conv, burstgpt, mooncake, or a .csv / .jsonl file")
    arg("--addr", metavar="HOST:PORT", default=default_addr(), help="server (default $TIDAL_ADDR or 127.0.0.1:50051)")
    arg("--http", metavar="URL", help="send the same workload over the OpenAI API at URL (e.g. http://127.0.0.1:8000: "
        "streamed /v1/completions) instead of gRPC at --addr")
    arg("--rate-scale", metavar="X", type=float, default=1.0, help="speed the trace's clock up X times (2 = twice)")
    arg("--arrivals", choices=["trace", "poisson", "gamma"], default="trace",
        help="the trace's timestamps (default), or synthetic arrivals at --rate with the trace's lengths")
    arg("--rate", metavar="R", type=float, help="requests per second of --arrivals poisson|gamma")
    arg("--cv", metavar="C", type=float, default=1.0, help="coefficient of variation of gamma gaps (default 1)")
    arg("--duration", metavar="S", type=float, help="send only the requests scheduled in the first S seconds")
    arg("--num-requests", metavar="N", type=int, help="send at most N requests")
    arg("--max-prompt", metavar="N", type=int,
        help="shrink all lengths by one factor (shape kept) so the p99 prompt fits N tokens ...")
    arg("--max-output", metavar="N", type=int, help="... and the p99 output fits N tokens")
    arg("--priority-mix", metavar="F:P", default="", help="FRACTION:PRIORITY[,...], e.g. 0.1:1; the rest get 0")
    arg("--seed", metavar="N", type=int, default=0, help="seeds arrivals, priorities and prompts (default 0)")
    arg("--model", metavar="M", default="smollm2-135m", help="the served model, whose tokenizer builds the prompts")
    arg("--timeout", metavar="S", type=float, default=300.0, help="deadline of each request (default 300 s)")
    arg("--connect-timeout", metavar="S", type=float, default=10.0, help="wait this long for the server (default 10)")
    arg("--slo-ttft-ms", metavar="MS", type=float, default=1000.0, help="goodput's bound on TTFT (default 1000)")
    arg("--slo-tpot-ms", metavar="MS", type=float, default=100.0, help="goodput's bound on TPOT (default 100)")
    add_connection_args(p)
    arg("--output", metavar="FILE", help="FILE.json: the summary and every request; FILE.csv: one row a request")
    arg("--plot", metavar="FILE", help="draw the latency CDFs to FILE.png")
    arg("--no-progress", action="store_true", help="no progress bar on stderr")

class UsageError(ValueError):
    """Bad flags or inputs: the message says what to change."""


# ----- prompts ----------------------------------------------------------------------------------------------------

class PromptSource:
    """Prompts of exact token counts without encoding text per request.

    One long passage is encoded once (`orchestrator.bench.traces.synthetic_prompt`); request i gets a window of it at an
    offset seeded by i, after the BOS token when the tokenizer adds one, so prompts differ from each other.
    A request with the trace's hash ids (Mooncake) is built block by block instead: the window of block id h is
    seeded by h, so requests whose leading ids are equal share a prefix of equal tokens, as in the trace
    (`orchestrator.bench.traces.hash_block_prompt`).
    """

    def __init__(self, tokenizer, longest: int, seed: int):
        from orchestrator.bench.traces import synthetic_prompt

        ids = synthetic_prompt(tokenizer, 2 * longest + 512, seed)
        bos = getattr(tokenizer, "bos_token_id", None)
        self._head = ids[:1] if getattr(tokenizer, "add_bos", False) and ids[0] == bos else []
        self._body = ids[len(self._head):]
        self._seed = seed

    def ids(self, index: int, n: int, hash_ids: tuple[int, ...] = (), block_tokens: float = 512.0) -> list[int]:
        k = n - len(self._head)
        if k <= 0:
            return self._head[:n]
        if hash_ids:
            from orchestrator.bench.traces import hash_block_prompt

            return self._head + hash_block_prompt(hash_ids, k, block_tokens, self._window,
                                                  lambda m: self._window(f"prompt-{index}", m))
        return self._head + self._window(f"prompt-{index}", k)

    def _window(self, key, k: int) -> list[int]:
        k = min(k, len(self._body))
        offset = random.Random(f"{self._seed}-{key}").randrange(len(self._body) - k + 1)
        return self._body[offset:offset + k]


def _request(p: PlannedRequest, ids: list[int], request_id: str):
    from tidal.v1 import generation_pb2

    req = generation_pb2.GenerateRequest(
        max_tokens=p.output_tokens, priority=p.priority, request_id=request_id,
        sampling=generation_pb2.SamplingParams(temperature=0.0, ignore_eos=True))
    req.token_ids.ids.extend(ids)
    return req


# ----- progress -----------------------------------------------------------------------------------------------------

class Progress:
    """sent / finished / failed counts on stderr: a bar redrawn in place on a terminal, else a line every 10 s."""

    def __init__(self, total: int, enabled: bool, stream=sys.stderr):
        self.total, self.sent, self.ok, self.failed = total, 0, 0, 0
        self._enabled, self._stream = enabled, stream
        self._tty = enabled and stream.isatty()
        self._start = time.monotonic()
        self._last_line = -math.inf
        self._drawn = 0

    def finished(self, record: RequestRecord) -> None:
        if record.ok:
            self.ok += 1
        elif record.status != CANCELLED:
            self.failed += 1

    def line(self) -> str:
        done = self.ok + self.failed
        width = 30
        filled = int(width * done / self.total) if self.total else width
        return (f"[{'#' * filled}{'-' * (width - filled)}] {done}/{self.total} done, {self.sent} sent, "
                f"{self.failed} failed, {self.sent - done} in flight, {time.monotonic() - self._start:.0f} s")

    def draw(self, final: bool = False) -> None:
        if not self._enabled:
            return
        if self._tty:
            text = self.line()
            self._stream.write("\r" + text.ljust(self._drawn) + ("\n" if final else ""))
            self._drawn = len(text)     # pad the next line over this one's tail
        elif final or time.monotonic() - self._last_line >= 10.0:
            self._stream.write(self.line() + "\n")
            self._last_line = time.monotonic()
        self._stream.flush()

    async def run(self, period_s: float = 0.25) -> None:
        while True:
            self.draw()
            await asyncio.sleep(period_s)


# ----- the replay -------------------------------------------------------------------------------------------------

class Replay:
    """Sends a plan's requests on schedule over one channel and records their streams."""

    def __init__(self, plan: list[PlannedRequest], prompts: PromptSource, timeout_s: float, progress: Progress,
                 metadata: tuple[tuple[str, str], ...] = ()):
        self.plan, self.prompts, self.timeout_s, self.progress = plan, prompts, timeout_s, progress
        self.metadata = metadata            # the API key, when the server wants one
        run_id = uuid.uuid4().hex[:8]
        self.records = [RequestRecord(index=p.index, scheduled_s=p.at_s, prompt_tokens=p.prompt_tokens,
                                      max_tokens=p.output_tokens, priority=p.priority,
                                      request_id=f"replay-{run_id}-{p.index}") for p in plan]
        self.stop = asyncio.Event()
        self.http = None                # an httpx.AsyncClient on the OpenAI API: send over HTTP instead of gRPC
        self.model = ""                 # the served model (the OpenAI API's `model` field)
        self._inflight: set[asyncio.Task] = set()
        self._t0 = 0.0

    def _now(self) -> float:
        return time.monotonic() - self._t0

    async def run(self, channel: grpc.aio.Channel | None) -> None:
        """Until every request has ended, or until `stop` is set (then what is in flight is cancelled). Over
        HTTP (`self.http`), `channel` is None."""
        from tidal.v1 import generation_pb2_grpc

        stub = generation_pb2_grpc.GenerationServiceStub(channel) if channel is not None else None
        self._t0 = time.monotonic()
        dispatcher = asyncio.create_task(self._dispatch(stub))
        stopper = asyncio.create_task(self.stop.wait())
        ticker = asyncio.create_task(self.progress.run())
        try:
            await asyncio.wait({dispatcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
            while self._inflight and not self.stop.is_set():
                await asyncio.wait({*self._inflight, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (dispatcher, *self._inflight, stopper, ticker):
                task.cancel()
            await asyncio.gather(dispatcher, *self._inflight, stopper, ticker, return_exceptions=True)
            self.progress.draw(final=True)

    async def _dispatch(self, stub) -> None:
        for p, record in zip(self.plan, self.records):
            delay = p.at_s - self._now()
            # sleep until the request is due; when late, still yield once so streams are read between sends
            await asyncio.sleep(max(0.0, delay))
            task = asyncio.create_task(self._one(stub, p, record))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            self.progress.sent += 1

    async def _one(self, stub, p: PlannedRequest, r: RequestRecord) -> None:
        from tidal.v1 import generation_pb2

        if self.http is not None:
            return await self._one_http(p, r)
        req = _request(p, self.prompts.ids(p.index, p.prompt_tokens, p.hash_ids, p.block_tokens), r.request_id)
        r.sent_s = self._now()
        call = stub.Generate(req, timeout=self.timeout_s, metadata=self.metadata)
        try:
            async for resp in call:
                now = self._now()
                if resp.token_ids:
                    r.chunk_times_s.append(now)
                    r.chunk_tokens.append(len(resp.token_ids))
                    if resp.instance_id and (not r.instances or r.instances[-1] != resp.instance_id):
                        r.instances.append(resp.instance_id)
                r.end_s = now
                if resp.finish_reason:
                    r.finish_reason = generation_pb2.FinishReason.Name(resp.finish_reason).removeprefix(
                        "FINISH_REASON_")
            if r.finish_reason == "ABORT":
                r.status, r.error = "ABORTED", "the server ended the stream with finish reason ABORT"
            else:
                r.status = OK
        except grpc.aio.AioRpcError as e:
            r.end_s = self._now()
            r.status, r.error = e.code().name, e.details() or ""
        except asyncio.CancelledError:
            call.cancel()
            r.end_s = self._now()
            r.status, r.error = CANCELLED, "stopped by the user before it finished"
            raise
        finally:
            self.progress.finished(r)


    async def _one_http(self, p: PlannedRequest, r: RequestRecord) -> None:
        """The same request as `_one`, as a streamed OpenAI completion (token ids in, `return_token_ids` out)."""
        import json

        body = {"model": self.model, "prompt": self.prompts.ids(p.index, p.prompt_tokens, p.hash_ids, p.block_tokens),
                "max_tokens": p.output_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "priority": p.priority, "request_id": r.request_id, "return_token_ids": True,
                "timeout": self.timeout_s}
        r.sent_s = self._now()
        try:
            async with self.http.stream("POST", "/v1/completions", json=body, timeout=self.timeout_s) as resp:
                if resp.status_code != 200:
                    error = json.loads(await resp.aread()).get("error", {})
                    r.end_s = self._now()
                    r.status, r.error = f"HTTP_{resp.status_code}", error.get("message", "")
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    now = self._now()
                    r.end_s = now
                    if line == "data: [DONE]":
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        r.status, r.error = "STREAM_ERROR", event["error"].get("message", "")
                        return
                    choice = event["choices"][0] if event.get("choices") else None
                    if choice is None:
                        continue
                    if choice.get("token_ids"):
                        r.chunk_times_s.append(now)
                        r.chunk_tokens.append(len(choice["token_ids"]))
                    if choice.get("finish_reason"):
                        r.finish_reason = choice["finish_reason"].upper()
            if r.finish_reason == "ABORT":
                r.status, r.error = "ABORTED", "the server ended the stream with finish reason abort"
            else:
                r.status = OK
        except asyncio.CancelledError:
            r.end_s = self._now()
            r.status, r.error = CANCELLED, "stopped by the user before it finished"
            raise
        except Exception as e:  # noqa: BLE001 - a connection error: counted as failed with what it was
            r.end_s = self._now()
            r.status, r.error = "HTTP_ERROR", f"{type(e).__name__}: {e}"
        finally:
            self.progress.finished(r)


async def run_http(replay: Replay, url: str, connect_timeout_s: float) -> None:
    """Replay over the OpenAI API at `url`, once its /health says it serves."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=replay.timeout_s,
                                 headers=dict(replay.metadata)) as client:
        deadline = time.monotonic() + connect_timeout_s
        while True:
            try:
                if (await client.get("/health", timeout=1.0)).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ConnectionError(f"no serving server at {url} after {connect_timeout_s:g} s; start one with "
                                      f"`tidal serve` or pass --http") from None
            await asyncio.sleep(0.2)
        replay.http = client
        await replay.run(None)


async def _run(replay: Replay, addr: str, connect_timeout_s: float, http: str | None = None,
               credentials: grpc.ChannelCredentials | None = None) -> bool:
    """Replays; False when the run was interrupted. Raises ConnectionError when no server answers."""
    loop = asyncio.get_running_loop()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        if not interrupted:
            print(f"\ntidal bench replay: interrupted; cancelling {len(replay._inflight)} streams in flight",
                  file=sys.stderr)
        interrupted = True
        replay.stop.set()

    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, interrupt)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):   # not the main thread, or no signals here
            pass
    try:
        if http:
            await run_http(replay, http, connect_timeout_s)
            return not interrupted
        channel = grpc.aio.secure_channel(addr, credentials) if credentials else grpc.aio.insecure_channel(addr)
        async with channel:
            try:
                await asyncio.wait_for(channel.channel_ready(), connect_timeout_s)
            except asyncio.TimeoutError:
                raise ConnectionError(f"no server at {addr} after {connect_timeout_s:g} s; start one with "
                                      f"`tidal serve` or pass --addr") from None
            await replay.run(channel)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    return not interrupted


# ----- the command ------------------------------------------------------------------------------------------------

def _plan(args) -> tuple[list[PlannedRequest], dict]:
    from orchestrator.bench.traces import length_scale, load_trace, scale_lengths

    if args.cv != 1.0 and args.arrivals != "gamma":
        raise UsageError("--cv applies to --arrivals gamma only")
    if args.rate is not None and args.arrivals == "trace":
        raise UsageError("--rate applies to --arrivals poisson|gamma; use --rate-scale to speed up the trace")
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    for flag in ("output", "plot"):
        value = getattr(args, flag)
        allowed = (".json", ".csv") if flag == "output" else (".png",)
        if value and Path(value).suffix not in allowed:
            raise UsageError(f"--{flag} {value}: name a {' or '.join(allowed)} file")
    try:
        rows = load_trace(args.trace)
        factor = 1.0
        if args.max_prompt is not None or args.max_output is not None:
            max_prompt = args.max_prompt or max(r.prompt_tokens for r in rows)
            max_output = args.max_output or max(r.output_tokens for r in rows)
            factor = length_scale(rows, max_prompt, max_output)
            rows = scale_lengths(rows, max_prompt, max_output, factor=factor)
        plan = build_schedule(rows, arrivals=args.arrivals, rate_scale=args.rate_scale, rate=args.rate, cv=args.cv,
                              duration_s=args.duration, num_requests=args.num_requests,
                              priority_mix=parse_priority_mix(args.priority_mix), seed=args.seed)
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None
    run = {key: getattr(args, key) for key in ("trace", "addr", "http", "arrivals", "rate_scale", "rate", "cv", "duration",
                                               "num_requests", "max_prompt", "max_output", "priority_mix", "seed",
                                               "model", "timeout")}
    run.update(length_scale=factor, trace_requests=len(rows), planned_requests=len(plan),
               planned_span_s=plan[-1].at_s if plan else 0.0)
    return plan, run


def cmd_replay(args) -> int:
    name = "tidal bench replay"
    try:
        plan, run = _plan(args)
        if not plan:
            raise UsageError("no request falls within --duration; give a longer one")
        from instance.model.loader import load_tokenizer

        prompts = PromptSource(load_tokenizer(args.model), max(p.prompt_tokens for p in plan), args.seed)
    except UsageError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:      # the tokenizer's model could not be found or read
        print(f"{name}: --model {args.model}: {e}", file=sys.stderr)
        return EXIT_USAGE
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    mix = f", priority mix {args.priority_mix}" if args.priority_mix else ""
    when = (f"trace timestamps / {args.rate_scale:g}" if args.arrivals == "trace"
            else f"{args.arrivals} arrivals at {args.rate:g}/s" + (f", CV {args.cv:g}" if args.arrivals == "gamma"
                                                                  else ""))
    print(f"{name}: {len(plan)} requests of {args.trace} over {run['planned_span_s']:.1f} s ({when}{mix}) "
          f"to {args.http or args.addr}; lengths / {run['length_scale']:.2f}", flush=True)

    progress = Progress(len(plan), enabled=not args.no_progress)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        credentials = (client_credentials(args.tls_ca, args.tls_cert, args.tls_key)
                       if args.tls or args.tls_ca or args.tls_cert else None)
        replay = Replay(plan, prompts, args.timeout, progress, client_metadata(args.api_key))
        replay.model = args.model
        completed = asyncio.run(_run(replay, args.addr, args.connect_timeout, args.http, credentials))
    except (ConnectionError, ValueError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return EXIT_FAILED
    run.update(started_at=started.isoformat(timespec="seconds"), interrupted=not completed)
    sent = [r for r in replay.records if not math.isnan(r.sent_s)]

    from orchestrator.bench.report import format_report, write_results

    title = f"replay of {args.trace}" + ("" if completed else " (interrupted)")
    print(format_report(sent, slo, title) if sent else f"{title}: no request was sent")
    if args.output:
        write_results(args.output, sent, slo, run)
        print(f"wrote {args.output}", file=sys.stderr)
    if args.plot and sent:
        from orchestrator.bench.plot import plot_cdfs

        plot_cdfs(args.plot, sent, slo, title)
        print(f"wrote {args.plot}", file=sys.stderr)
    if not completed:
        return EXIT_INTERRUPTED
    return 0 if any(r.ok for r in sent) else EXIT_FAILED


def main(args: argparse.Namespace) -> int:
    if args.bench == "replay":
        try:
            return cmd_replay(args)
        except KeyboardInterrupt:       # before the run (loading, building prompts) or while writing files
            print("tidal bench replay: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    raise AssertionError(f"unknown bench command {args.bench!r}")
