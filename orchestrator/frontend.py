"""Frontend: the gRPC server clients talk to, run inside a Ray actor so instances can push tokens to it.

It validates and tokenizes at the edge, dispatches on the latest instance table the scheduler pushed (no
scheduler call per request), and streams each request's chunks in `seq` order. A client cancel or deadline
aborts the request on the instance holding it. Shutdown is graceful: health goes NOT_SERVING, new requests
are refused, in-flight ones get a grace period, then whatever is left is aborted.

Faults, seen without waiting for the scheduler: an instance that answers as dead (`ActorDead`) is fenced here
at once — no more dispatch to it, its streams fail over — until the scheduler's table shows a replacement.
A failover resumes a stream elsewhere within FAILOVER_BOUND_S or ends it with UNAVAILABLE; a stream that
makes no progress (no token, and its instance's status no longer lists it) for the idle bound ends too. While
instances are coming back (starting, or dead with --restart-dead-instances), a request with nowhere to go
waits for one, within the same bounds, instead of failing at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import re
import time
import uuid
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from instance.backends import load_tokenizer
from instance.kv_cache import block_hashes, blocks_for
from instance.limits import (DEFAULT_MAX_TOKENS, DEFAULT_PREFILL_TOKENS_PER_S, FAILOVER_BOUND_S, MAX_REQUEST_ID_CHARS,
                             ORPHANS_REMEMBERED, SCHEDULER_SILENCE_S, STREAM_IDLE_MARGIN_S)
from instance.messages import TokenChunk
from instance.sampling import InvalidRequestError, SamplingParams, validate_request
from orchestrator.config import ServeConfig
from orchestrator.errors import AdminError
from orchestrator.fleet import DEAD, SERVING, STARTING, InstanceView
from orchestrator.metrics import FrontendMetrics
from orchestrator.policies.dispatch import Candidate, choose_instance
from orchestrator.policies.prefix import PrefixIndex
from orchestrator.policies.pd import ROLES, takes_prompts
from orchestrator.security import Auditor, AuthInterceptor, Authenticator, server_credentials
from rpc import ActorDead, ActorTimeout, BackgroundTasks, Call, Rejected
from rpc.frontend import FrontendClient
from rpc.instance import InstanceClient
from rpc.scheduler import SchedulerClient
from tidal.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = ("tidal.v1.GenerationService", "tidal.v1.AdminService")
REQUEST_ID = re.compile(rf"[A-Za-z0-9._:@/-]{{1,{MAX_REQUEST_ID_CHARS}}}")
PROGRESS_CHECK_S = 1.0         # how often a quiet stream checks whether it still makes progress
CAPACITY_POLL_S = 0.1          # how often a request with nowhere to go looks again
FINISH_REASONS = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
    "abort": generation_pb2.FINISH_REASON_ABORT,
}
INSTANCE_STATES = {
    "starting": admin_pb2.INSTANCE_STATE_STARTING,
    "serving": admin_pb2.INSTANCE_STATE_SERVING,
    "draining": admin_pb2.INSTANCE_STATE_DRAINING,
    "dead": admin_pb2.INSTANCE_STATE_DEAD,
}
INSTANCE_ROLES = {role: admin_pb2.InstanceRole.Value(f"INSTANCE_ROLE_{role.upper()}") for role in ROLES}


class RpcError(Exception):
    """Ends an RPC with a status code and a message meant for the caller."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class RequestStream:
    """One request's chunks, delivered in seq order whatever order (or instance) they arrive from, and what
    failover needs to resume it elsewhere: its prompt, params and the tokens its client already has."""

    request_id: str
    instance: InstanceClient                                        # where it runs now
    prompt_ids: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    priority: int = 0
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)     # TokenChunk, or an RpcError that ends it
    next_seq: int = 0
    held: dict[int, TokenChunk] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)                 # delivered so far, in order
    text_len: int = 0
    retries: int = 0
    failing_over: bool = False
    progress_at: float = field(default_factory=time.monotonic)      # a chunk came, or its instance listed it

    def offer(self, chunk: TokenChunk) -> None:
        if chunk.seq < self.next_seq or chunk.seq in self.held:
            return                                   # a duplicate: already delivered or held
        self.progress_at = time.monotonic()
        self.held[chunk.seq] = chunk
        while self.next_seq in self.held:
            c = self.held.pop(self.next_seq)
            self.tokens += c.token_ids
            self.text_len += len(c.text)
            self.queue.put_nowait(c)
            self.next_seq += 1

    def fail(self, code: grpc.StatusCode, message: str) -> None:
        self.queue.put_nowait(RpcError(code, message))


@dataclass
class _Pending:
    """A request this frontend sent that the instance's last reported load may not include yet."""

    blocks: int
    accepted_at_step: int | None = None
    prefill_tokens: int = 0       # its prompt less what the instance caches of it, weighted (prefix-aware)


class Frontend:
    def __init__(self, config: dict, name: str):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.config = ServeConfig(**config)
        self.name = name
        self.tokenizer = load_tokenizer(self.config.engine)
        self.views: dict[str, InstanceView] = {}
        self.streams: dict[str, RequestStream] = {}
        self.pending: dict[str, dict[str, _Pending]] = {}     # instance id -> request id -> pending
        self.fenced: dict[str, object] = {}                   # instance id -> the actor seen dead here
        self.control = None                                   # ControlState: the store's health, scaling
        self._orphans: dict[str, None] = {}                   # request ids already aborted as orphans
        self.accepting = False
        self.shutting_down = False
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self._rng = random.Random()
        self._turn = 0
        self.prefixes = PrefixIndex()                         # where prefixes live (prefix-aware dispatch)
        self._hash_seed = self.config.engine.prefix_cache_seed()
        self._last_hashes: tuple[list[int] | None, list[int]] = (None, [])
        self.me: FrontendClient | None = None                 # the sink instances push this frontend's chunks to
        self.scheduler: SchedulerClient | None = None
        self.port = 0
        self._last_update = time.monotonic()
        self.tasks = BackgroundTasks(f"frontend {name}")
        self._watchdog: asyncio.Task | None = None
        self.started_at = time.time()
        self.metrics = FrontendMetrics(lambda: list(self.views.values()),
                                       lambda: getattr(self.control, "metrics", None), lambda: len(self.streams))
        self.http = None                                      # orchestrator.http.server.HttpServer
        self.http_port = 0
        self.auth = Authenticator(set(), set())               # the configured keys, from start()

    # ----- lifecycle -------------------------------------------------------------------------------------------
    async def start(self, scheduler: SchedulerClient) -> int:
        """Bind the gRPC server, register with the scheduler, and return the port."""
        if self.server is not None:
            return self.port
        self.me = FrontendClient.current(self.name, self.config.deadlines)
        self.scheduler = scheduler
        security = self.config.security
        auth = self.auth = Authenticator.from_config(security)   # a key file it cannot read fails the start
        creds = server_credentials(security)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)],
                                 interceptors=[AuthInterceptor(auth, Auditor(security.audit_log))])
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        addr = f"{self.config.host}:{self.config.port}"
        self.port = server.add_secure_port(addr, creds) if creds else server.add_insecure_port(addr)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {addr}: is the port in use? pick another with --port")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.server = server
        from orchestrator.http.server import HttpServer

        self.http = HttpServer(self, self.config.host, self.config.http_port)
        try:
            self.http_port = await self.http.start()
        except RuntimeError:
            await server.stop(grace=None)
            self.server = None
            raise
        await self.update_instances(await scheduler.register_frontend(self.name, self.me))
        self._watchdog = self.tasks.spawn("scheduler watchdog", self._watch_scheduler())
        log.info("frontend %s listening on %s:%d (gRPC) and :%d (HTTP) (%s; %s)", self.name, self.config.host,
                 self.port, self.http_port,
                 "TLS" + (", client certificates required" if security.tls_client_ca else "") if creds else "plaintext",
                 f"{len(auth.api)} API keys, {len(auth.admin)} admin keys" if auth.enabled else "no keys: open")
        return self.port

    async def get_http_port(self) -> int:
        return self.http_port

    async def pid(self) -> int:
        """The frontend's process (for operators, and for benchmarks that read its CPU time)."""
        return os.getpid()

    async def _watch_scheduler(self) -> None:
        """While the scheduler is down, serving goes on with the last instance table; once it is back (Ray
        restarts it), register again so it pushes tables here."""
        while not self.shutting_down:
            await asyncio.sleep(SCHEDULER_SILENCE_S / 2)
            if time.monotonic() - self._last_update < SCHEDULER_SILENCE_S:
                continue
            try:
                views = await self.scheduler.register_frontend(self.name, self.me, list(self.views.values()),
                                                               self.config.startup_timeout_s)
                await self.update_instances(views)
                log.info("frontend %s: registered again with the scheduler", self.name)
            except Exception as e:  # noqa: BLE001 - keep serving on the last table and keep trying
                log.warning("frontend %s: the scheduler is unreachable (%r); serving on the last instance table",
                            self.name, e)

    async def shutdown(self, grace_s: float | None = None) -> int:
        """Stop accepting, let in-flight requests finish for the grace period, abort the rest. Returns how many
        were aborted."""
        grace = self.config.grace_period_s if grace_s is None else grace_s
        self.shutting_down = True
        self.accepting = False
        if self._watchdog is not None:
            self._watchdog.cancel()
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = time.monotonic() + grace
        while self.streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.streams.values())
        for stream in left:
            stream.fail(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        await asyncio.gather(*(self._abort_on_instance(s) for s in left), return_exceptions=True)
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        log.info("frontend %s shut down; %d requests aborted after the %.1f s grace period", self.name,
                 len(left), grace)
        return len(left)

    def control_plane(self) -> admin_pb2.ControlPlane:
        """How the scheduler and its state store look from here (answered even while the scheduler is down)."""
        silent = time.monotonic() - self._last_update
        msg = admin_pb2.ControlPlane(scheduler_reachable=silent < SCHEDULER_SILENCE_S, scheduler_silent_s=silent)
        store = self.control.store if self.control is not None else None
        if store is not None:
            msg.state_store, msg.state_store_reachable = store.url, store.reachable
            msg.state_store_error, msg.unwritten_intent = store.error, store.unwritten
        scaling = self.control.scaling if self.control is not None else None
        if scaling is not None:
            msg.autoscale, msg.target_instances, msg.scaling = scaling.autoscale, scaling.target, scaling.in_flight
            msg.last_scale_decision = scaling.last_decision
            msg.last_scale_age_s = time.time() - scaling.last_decision_at if scaling.last_decision_at else 0.0
        return msg

    async def is_serving(self) -> bool:
        return self.accepting

    async def ping(self) -> bool:
        """Instances ping the frontends of their requests; a dead frontend's requests are aborted."""
        return True

    async def _set_health(self, status) -> None:
        for service in ("", *SERVICES):
            await self.health.set(service, status)

    # ----- pushed by the scheduler and the instances -----------------------------------------------------------
    async def update_instances(self, views: list[InstanceView], control=None) -> None:
        now = self._last_update = time.monotonic()
        self.views = {v.instance_id: v for v in views}
        if control is not None:
            self.control = control
        for iid, actor in list(self.fenced.items()):
            view = self.views.get(iid)
            if view is not None and view.client.actor != actor and view.state != DEAD:
                log.info("frontend %s: %s was replaced; dispatching to it again", self.name, iid)
                del self.fenced[iid]
        for v in views:
            pending = self.pending.get(v.instance_id)
            if pending and v.status is not None:
                for rid in [r for r, p in pending.items()
                            if p.accepted_at_step is not None and v.status.step_index > p.accepted_at_step]:
                    del pending[rid]
            for r in v.status.requests if v.status is not None else ():
                stream = self.streams.get(r.request_id)
                if stream is not None and stream.instance.instance_id == v.instance_id:
                    stream.progress_at = now
        dead = {v.instance_id for v in views if v.state == DEAD} | set(self.fenced)
        for stream in list(self.streams.values()):
            if stream.instance.instance_id in dead:
                self._fail_over(stream)
        serving = [v for v in views if v.state == SERVING]
        if (not self.accepting and not self.shutting_down and serving and len(serving) == len(views)
                and self.server is not None):
            self.accepting = True
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("frontend %s: %d instances serving; health SERVING", self.name, len(serving))

    async def push_chunks(self, chunks: list[TokenChunk]) -> None:
        for chunk in chunks:
            stream = self.streams.get(chunk.request_id)
            if stream is not None:
                stream.offer(chunk)
            elif chunk.finish_reason is None:
                view = self.views.get(chunk.instance_id)
                if view is not None:
                    self._abort_orphan(chunk.request_id, view.client)

    async def request_moved(self, request_id: str, instance: InstanceClient) -> None:
        """A migration committed: aborts of this request now go to its new instance."""
        stream = self.streams.get(request_id)
        if stream is None:
            self._abort_orphan(request_id, instance)
            return
        stream.instance = instance

    def _abort_orphan(self, request_id: str, instance: InstanceClient) -> None:
        """Tokens (or a move) for a stream this frontend no longer holds: its client is gone, stop it there."""
        if request_id in self._orphans:
            return
        self._orphans[request_id] = None
        while len(self._orphans) > ORPHANS_REMEMBERED:
            self._orphans.pop(next(iter(self._orphans)))
        self.tasks.spawn(f"abort orphan {request_id}", self._abort_on_instance(RequestStream(request_id, instance)))

    # ----- generation ----------------------------------------------------------------------------------------
    def parse(self, request) -> tuple[list[int], SamplingParams, int]:
        kind = request.WhichOneof("input")
        try:
            if kind == "prompt":
                if not request.prompt:
                    raise InvalidRequestError("prompt", "is empty; give at least one character of prompt")
                ids = self.tokenizer.encode(request.prompt)
            elif kind == "token_ids":
                ids = list(request.token_ids.ids)
            elif kind == "chat":
                if not request.chat.messages:
                    raise InvalidRequestError("chat", "has no messages; give at least one")
                messages = [{"role": m.role, "content": m.content} for m in request.chat.messages]
                ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(messages))
            else:
                raise InvalidRequestError("prompt", "missing; give one of prompt, token_ids or chat")
        except InvalidRequestError:
            raise
        except ValueError as e:
            raise InvalidRequestError(kind or "prompt", str(e)) from None
        model = self._model_limits()
        s = request.sampling
        if request.HasField("max_tokens"):
            max_tokens = request.max_tokens
        else:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, model[1] - len(ids)))
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=s.temperature if s.HasField("temperature") else 1.0,
            top_k=s.top_k, top_p=s.top_p if s.HasField("top_p") else 1.0, min_p=s.min_p,
            # unseeded requests get their seed here, so a resumed request draws the same tokens after failover
            seed=request.seed if request.HasField("seed") else self._rng.getrandbits(63),
            stop=tuple(request.stop), stop_token_ids=tuple(request.stop_token_ids), ignore_eos=s.ignore_eos)
        validate_request(ids, params, request.priority, vocab_size=model[0], max_model_len=model[1])
        return ids, params, request.priority

    def _model_limits(self) -> tuple[int, int]:
        infos = [v.info for v in self.views.values() if v.info is not None]
        if not infos:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "no instance has started yet; retry shortly")
        return min(i.vocab_size for i in infos), min(i.max_model_len for i in infos)

    def dispatch(self, prompt_len: int, exclude: frozenset = frozenset(),
                 prompt_ids: list[int] | None = None) -> InstanceView:
        """The instance for a new request (or a failover, `exclude`: the actors that already failed it);
        `prompt_ids` for prefix-aware dispatch."""
        serving = [v for v in self.views.values() if v.state == SERVING and v.status is not None
                   and v.client.actor not in exclude and v.instance_id not in self.fenced]
        if not serving:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "no instance is serving; retry later")
        pool = set(takes_prompts({v.instance_id: v.role for v in serving}, [v.instance_id for v in serving]))
        candidates = []
        hashes = self._prompt_hashes(prompt_ids, serving)
        for v in (v for v in serving if v.instance_id in pool):
            pending = self.pending.get(v.instance_id, {})
            candidates.append(Candidate(v.instance_id, v.status.load, pending_requests=len(pending),
                                        pending_blocks=sum(p.blocks for p in pending.values()),
                                        batch_slots=self.config.engine.max_num_seqs,
                                        cached_blocks=self.prefixes.cached_blocks(v.instance_id, hashes),
                                        pending_prefill_tokens=sum(p.prefill_tokens for p in pending.values())))
        open_ = [c for c in candidates if c.queue_length < self.config.max_queue_per_instance]
        if not open_:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"all {len(candidates)} instances have {self.config.max_queue_per_instance} or more "
                           f"queued requests; retry later")
        iid = choose_instance(self.config.dispatch_policy, open_, self._turn, self._rng, self.config.dispatch_top_k,
                              output_weight=self.config.dispatch_output_weight, prompt_tokens=prompt_len,
                              prefix_weight=self.config.dispatch_prefix_weight)
        self._turn += 1
        return self.views[iid]

    def _prompt_hashes(self, prompt_ids: list[int] | None, serving: list[InstanceView]) -> list[int]:
        """The prompt's prefix-cache hashes, for prefix-aware dispatch only; the index follows the latest
        snapshots (`PrefixIndex` rebuilds an instance's set only when its digest changed)."""
        if self.config.dispatch_policy != "prefix-aware" or not prompt_ids or self._hash_seed is None:
            return []
        for v in serving:
            self.prefixes.update(v.instance_id, v.status.load)
        self.prefixes.retain(v.instance_id for v in self.views.values())
        if self._last_hashes[0] is not prompt_ids:        # the same prompt asked twice: dispatch, then pending
            self._last_hashes = (prompt_ids, block_hashes(prompt_ids, serving[0].status.load.block_size,
                                                          self._hash_seed))
        return self._last_hashes[1]

    async def dispatch_when_possible(self, prompt_len: int, deadline: float,
                                     exclude: frozenset = frozenset(),
                                     prompt_ids: list[int] | None = None) -> InstanceView:
        """`dispatch`, or, while no instance is serving but some are coming back, wait for one until
        `deadline` (time.monotonic()); UNAVAILABLE once nothing is coming back or the deadline passed."""
        while True:
            try:
                return self.dispatch(prompt_len, exclude, prompt_ids)
            except RpcError as e:
                if e.code != grpc.StatusCode.UNAVAILABLE or not self._capacity_coming() or \
                        time.monotonic() + CAPACITY_POLL_S > deadline:
                    raise
            await asyncio.sleep(CAPACITY_POLL_S)

    def _capacity_coming(self) -> bool:
        """Whether an instance that does not serve now will: it is starting, or it died and will be replaced."""
        return any(v.state == STARTING or (self.config.restart_dead_instances and
                                           (v.state == DEAD or v.instance_id in self.fenced))
                   for v in self.views.values())

    def fence(self, instance: InstanceClient, why: str) -> None:
        """An instance answered as dead: stop dispatching to it here, now, and fail its streams over; it is
        taken back once the scheduler's table shows a replacement (another actor under its id)."""
        if self.fenced.get(instance.instance_id) is instance.actor:
            return
        self.fenced[instance.instance_id] = instance.actor
        streams = [s for s in self.streams.values() if s.instance.instance_id == instance.instance_id]
        log.warning("frontend %s: %s is dead (%s): no longer dispatched to; %d streams fail over", self.name,
                    instance.instance_id, why, len(streams))
        for stream in streams:
            self._fail_over(stream)

    def idle_bound_s(self) -> float:
        """How long a stream may go without progress: set, or the margin plus the longest prompt's prefill at
        the fastest rate this deployment has shown (DEFAULT_PREFILL_TOKENS_PER_S before it has shown one)."""
        if self.config.stream_idle_timeout_s is not None:
            return self.config.stream_idle_timeout_s
        rates = [v.status.load.tokens_per_s for v in self.views.values() if v.status is not None]
        rate = max([r for r in rates if r > 0] + [DEFAULT_PREFILL_TOKENS_PER_S])
        longest = max([v.info.max_model_len for v in self.views.values() if v.info is not None] or [0])
        return STREAM_IDLE_MARGIN_S + longest / rate
    async def generate(self, request, context):
        """The body of GenerationService.Generate and of the HTTP API's completions: yields TokenChunks, and
        records the request's metrics (outcome, tokens, TTFT, inter-token and end-to-end latency)."""
        timer = self.metrics.request_timer()
        outcome = "cancelled"                 # the client went away (or its deadline passed)
        try:
            async with contextlib.aclosing(self._generate(request, context, timer.accepted)) as chunks:
                async for chunk in chunks:
                    timer.chunk(chunk)
                    if chunk.finish_reason is not None:
                        outcome = chunk.finish_reason
                    yield chunk
        except RpcError as e:
            outcome = e.code.name.lower()
            raise
        finally:
            timer.ended(outcome)

    async def _generate(self, request, context, accepted=lambda: None):
        if not self.accepting:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the server is not serving (starting or shutting down)")
        try:
            ids, params, priority = self.parse(request)
        except InvalidRequestError as e:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        rid = request.request_id or uuid.uuid4().hex
        if not REQUEST_ID.fullmatch(rid):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request_id: at most {MAX_REQUEST_ID_CHARS} characters, each a letter, digit or one of "
                           f"._:@/- (got {len(rid)} characters: {rid[:40]!r}{'...' if len(rid) > 40 else ''})")
        if rid in self.streams:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id: {rid!r} is already running")
        remaining = context.time_remaining() if context is not None else None
        target = await self.dispatch_when_possible(
            len(ids), time.monotonic() + min(FAILOVER_BOUND_S, remaining if remaining is not None else math.inf),
            prompt_ids=ids)
        bs = target.status.load.block_size
        cached = self.prefixes.cached_blocks(target.instance_id, self._prompt_hashes(ids, [target]))
        pending = _Pending(blocks=blocks_for(len(ids) + 1, bs),
                           prefill_tokens=len(ids) - round(self.config.dispatch_prefix_weight * cached * bs))
        self.pending.setdefault(target.instance_id, {})[rid] = pending
        stream = RequestStream(rid, target.client, prompt_ids=ids, params=params, priority=priority)
        self.streams[rid] = stream
        finished = False
        try:
            try:
                pending.accepted_at_step = await target.client.add_request(rid, ids, params, priority, self.me)
                accepted()
            except Rejected as e:
                if isinstance(e.cause, InvalidRequestError):
                    raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(e.cause)) from None
                raise RpcError(grpc.StatusCode.INTERNAL,
                               f"instance {target.instance_id} failed to add the request: {e.cause!r}") from None
            except (ActorDead, ActorTimeout) as e:
                log.warning("instance %s did not accept %s (%s); trying another", target.instance_id, rid,
                            type(e).__name__)
                if isinstance(e, ActorDead):
                    self.fence(target.client, "it did not accept a request")
                self._fail_over(stream)
            while True:
                try:
                    item = await asyncio.wait_for(stream.queue.get(), PROGRESS_CHECK_S)
                except asyncio.TimeoutError:
                    bound = self.idle_bound_s()
                    if not stream.failing_over and time.monotonic() - stream.progress_at > bound:
                        raise RpcError(grpc.StatusCode.UNAVAILABLE,
                                       f"no progress on instance {stream.instance.instance_id} for {bound:.0f} s "
                                       f"(no token, and it no longer lists the request)") from None
                    continue
                if isinstance(item, RpcError):
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self.streams.pop(rid, None)
            self.pending.get(target.instance_id, {}).pop(rid, None)
            if not finished:
                self.tasks.spawn(f"abort {rid}", self._abort_on_instance(stream))

    def _fail_over(self, stream: RequestStream) -> None:
        """Start the stream's failover, unless one is under way (marked at once: two would race)."""
        if not stream.failing_over:
            stream.failing_over = True
            self.tasks.spawn(f"failover {stream.request_id}", self._failover(stream))

    async def _failover(self, stream: RequestStream) -> None:
        """The stream's instance died: resume the request on a live one from the tokens its client has, within
        FAILOVER_BOUND_S (waiting for an instance while one is coming back), or end it with UNAVAILABLE."""
        dead = {stream.instance.actor}          # the actors that failed this stream (a replacement may serve it)
        deadline = time.monotonic() + FAILOVER_BOUND_S
        try:
            while stream.request_id in self.streams:
                stream.retries += 1
                if stream.retries > self.config.request_retries:
                    self.metrics.failovers.labels("retries_spent").inc()
                    stream.fail(grpc.StatusCode.UNAVAILABLE,
                                f"instance {stream.instance.instance_id} failed and the retry budget "
                                f"({self.config.request_retries}) is spent")
                    return
                try:
                    target = await self.dispatch_when_possible(len(stream.prompt_ids) + len(stream.tokens),
                                                               deadline, exclude=frozenset(dead),
                                                               prompt_ids=stream.prompt_ids + stream.tokens)
                except RpcError as e:
                    self.metrics.failovers.labels("no_instance").inc()
                    stream.fail(grpc.StatusCode.UNAVAILABLE,
                                f"instance {stream.instance.instance_id} failed and no instance could take over "
                                f"within {FAILOVER_BOUND_S:.0f} s: {e}")
                    return
                stream.held.clear()          # whatever the dead instance sent past next_seq is regenerated
                stream.instance = target.client
                try:
                    await asyncio.wait_for(target.client.recover_request(
                        stream.request_id, stream.prompt_ids, list(stream.tokens), stream.params,
                        stream.params.seed, stream.priority, stream.text_len, self.me, stream.next_seq),
                        max(0.1, deadline - time.monotonic()))
                    stream.progress_at = time.monotonic()
                    log.info("failover: %s resumed on %s after %d tokens (attempt %d)", stream.request_id,
                             target.instance_id, len(stream.tokens), stream.retries)
                    self.metrics.failovers.labels("resumed").inc()
                    return
                except Rejected as e:
                    if isinstance(e.cause, InvalidRequestError) and e.cause.field == "request_id":
                        # a migration to this instance committed just before its source died: it is already here
                        log.info("failover: %s already lives on %s", stream.request_id, target.instance_id)
                        self.metrics.failovers.labels("resumed").inc()
                        return
                    self.metrics.failovers.labels("failed").inc()
                    stream.fail(grpc.StatusCode.INTERNAL, f"resuming on {target.instance_id} failed: {e.cause!r}")
                    return
                except ActorDead:
                    dead.add(target.client.actor)
                    self.fence(target.client, "it did not take over a request")
                except (ActorTimeout, asyncio.TimeoutError):
                    dead.add(target.client.actor)
        finally:
            stream.failing_over = False

    async def abort(self, request_id: str) -> str:
        stream = self.streams.get(request_id)
        if stream is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"request_id: no running request {request_id!r}")
        await self._abort_on_instance(stream)
        stream.queue.put_nowait(TokenChunk(request_id, stream.next_seq, (), "", stream.instance.instance_id,
                                           "abort"))
        stream.next_seq += 1
        return stream.instance.instance_id

    async def _admin(self, command: Call):
        try:
            return await command
        except Rejected as e:
            if isinstance(e.cause, AdminError):
                raise RpcError(grpc.StatusCode[e.cause.code], e.cause.message) from None
            raise RpcError(grpc.StatusCode.INTERNAL, f"{e.method} failed: {e.cause!r}") from None
        except ActorDead:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the scheduler is restarting; retry shortly") from None
        except ActorTimeout as e:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{e.method} did not finish in time") from None

    async def admin(self, command: Call):
        """Wait for an admin command forwarded to the scheduler; its AdminError becomes the RPC's status."""
        outcome = "internal"
        try:
            result = await self._admin(command)
            outcome = "ok"
            return result
        except RpcError as e:
            outcome = e.code.name.lower()
            raise
        finally:
            self.metrics.admin.labels(command.method, outcome).inc()

    async def _abort_on_instance(self, stream: RequestStream) -> None:
        where = stream.instance.instance_id
        try:
            await stream.instance.abort_request(stream.request_id)
            log.info("aborted %s on %s", stream.request_id, where)
        except ActorDead as e:
            log.warning("abort of %s on %s: %s", stream.request_id, where, e)
            self.fence(stream.instance, "it did not take an abort")
        except Exception as e:  # noqa: BLE001 - the instance may be gone; nothing else to free here
            log.warning("abort of %s on %s failed: %s", stream.request_id, where, e)


def chunk_to_proto(chunk: TokenChunk) -> generation_pb2.GenerateResponse:
    msg = generation_pb2.GenerateResponse(request_id=chunk.request_id, seq=chunk.seq, token_ids=chunk.token_ids,
                                          text=chunk.text, instance_id=chunk.instance_id)
    if chunk.finish_reason:
        msg.finish_reason = FINISH_REASONS[chunk.finish_reason]
        msg.usage.prompt_tokens = chunk.prompt_tokens
        msg.usage.completion_tokens = chunk.completion_tokens
    return msg


def migration_to_proto(r) -> admin_pb2.Migration:
    return admin_pb2.Migration(
        migration_id=r.migration_id, request_id=r.request_id, src=r.src, dst=r.dst,
        state=admin_pb2.MigrationState.Value(f"MIGRATION_STATE_{r.state.value.upper()}"), stages=r.stage,
        blocks_copied=r.blocks_copied, downtime_ms=r.downtime_ms, reason=r.reason, started_at=r.started_at,
        ended_at=r.ended_at)


def view_to_proto(v: InstanceView) -> admin_pb2.Instance:
    msg = admin_pb2.Instance(instance_id=v.instance_id, state=INSTANCE_STATES[v.state], role=INSTANCE_ROLES[v.role])
    if v.info is not None:
        msg.node_id, msg.node_ip, msg.model = v.info.node_id, v.info.node_ip, v.info.model
    if v.status is not None:
        msg.load.CopyFrom(admin_pb2.InstanceLoad(**v.status.load.to_dict()))
        msg.load_age_s = max(0.0, time.time() - v.observed_at)
        x = getattr(v.status, "experts", None)
        if x is not None:
            msg.experts.CopyFrom(admin_pb2.ExpertParallel(
                ep_size=x.ep_size, target=x.target, max_size=x.max_size, warm_workers=x.warm_workers,
                scaling=x.scaling, last_scale=x.last_scale, remote_ms_per_layer=x.remote_ms_per_layer,
                workers_lost=x.workers_lost, warm_pids=list(x.warm_pids),
                ranks=[admin_pb2.ExpertRank(rank=r.rank, experts=r.experts, load_share=r.load_share, pid=r.pid,
                                            layers=list(r.layers)) for r in x.ranks]))
    return msg


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, frontend: Frontend):
        self.fe = frontend

    async def Generate(self, request, context):
        try:
            async for chunk in self.fe.generate(request, context):
                yield chunk_to_proto(chunk)
        except RpcError as e:
            await context.abort(e.code, str(e))

    async def Abort(self, request, context):
        try:
            return generation_pb2.AbortResponse(instance_id=await self.fe.abort(request.request_id))
        except RpcError as e:
            await context.abort(e.code, str(e))


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, frontend: Frontend):
        self.fe = frontend

    async def ListInstances(self, request, context):
        views = sorted(self.fe.views.values(), key=lambda v: v.instance_id)
        return admin_pb2.ListInstancesResponse(instances=[view_to_proto(v) for v in views],
                                               control_plane=self.fe.control_plane())

    async def GetInstance(self, request, context):
        v = self.fe.views.get(request.instance_id)
        if v is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"instance_id: no instance {request.instance_id!r}")
        return admin_pb2.GetInstanceResponse(instance=view_to_proto(v))

    async def _admin(self, context, command: Call):
        try:
            return await self.fe.admin(command)
        except RpcError as e:
            await context.abort(e.code, str(e))

    async def DrainInstance(self, request, context):
        report = await self._admin(context, self.fe.scheduler.drain(request.instance_id))
        return admin_pb2.DrainInstanceResponse(
            instance_id=report.instance_id, moved=[migration_to_proto(r) for r in report.moved],
            not_moved=[admin_pb2.NotMoved(request_id=rid, reason=why) for rid, why in report.not_moved],
            remaining=report.remaining)

    async def UndrainInstance(self, request, context):
        state = await self._admin(context, self.fe.scheduler.undrain(request.instance_id))
        return admin_pb2.UndrainInstanceResponse(state=INSTANCE_STATES[state])

    async def Rebalance(self, request, context):
        records = await self._admin(context, self.fe.scheduler.rebalance())
        return admin_pb2.RebalanceResponse(migrations=[migration_to_proto(r) for r in records])

    async def MigrateRequest(self, request, context):
        record = await self._admin(context, self.fe.scheduler.migrate(request.request_id,
                                                                      request.to_instance_id or None))
        return admin_pb2.MigrateRequestResponse(migration=migration_to_proto(record))

    async def ListMigrations(self, request, context):
        in_flight, recent = await self._admin(context, self.fe.scheduler.list_migrations())
        return admin_pb2.ListMigrationsResponse(in_flight=[migration_to_proto(r) for r in in_flight],
                                                recent=[migration_to_proto(r) for r in recent])

    async def ScaleInstances(self, request, context):
        r = await self._admin(context, self.fe.scheduler.scale_instances(request.instances))
        return admin_pb2.ScaleInstancesResponse(
            previous=r.previous, instances=r.target, added=r.added, removed=r.removed, reason=r.reason,
            not_moved=[admin_pb2.NotMoved(request_id=rid, reason=why) for rid, why in r.not_moved])

    async def ScaleExperts(self, request, context):
        r = await self._admin(context, self.fe.scheduler.scale_experts(request.instance_id, request.ep_size,
                                                                       request.dry_run))
        return admin_pb2.ScaleExpertsResponse(
            instance_id=r.instance_id, previous=r.previous, ep_size=r.ep_size, result=r.result, ok=r.ok,
            moves=[admin_pb2.ExpertMove(layer=m.layer, expert=m.expert, src=m.src, dst=m.dst) for m in r.moves],
            bytes_moved=r.bytes_moved, prepare_ms=r.prepare_ms, transfer_ms=r.transfer_ms, switch_ms=r.switch_ms,
            total_ms=r.total_ms, ranks=list(r.ranks))

    async def SetRole(self, request, context):
        role = {value: name for name, value in INSTANCE_ROLES.items()}.get(request.role)
        if role is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"role: choose one of {', '.join(ROLES)} (got {request.role})")
        previous = await self._admin(context, self.fe.scheduler.set_role(request.instance_id, role))
        return admin_pb2.SetRoleResponse(previous=INSTANCE_ROLES[previous], role=INSTANCE_ROLES[role])
