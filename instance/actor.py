"""InstanceActor: one serving instance, run as a Ray actor around one engine.

It only composes Ray-free parts: the engine (`EngineBackend`), its step loop (`StepLoop`: steps in a worker
thread, changes between steps), the stream registry (`StreamRegistry`: where each request's chunks go), and the
two halves of live migration over the engine (`EngineSourcePort` for `migrate_out`, `EngineDestinationPort`
behind `MigrationDestination` for the `migration_*` calls). After every step the new tokens go straight to
the frontend that owns each request, never through the scheduler.

Its RPCs, which `rpc.instance.InstanceClient` calls: `start`, `stop`, `get_status`, `check_integrity`;
`add_request`, `recover_request` (failover: re-prefill from the tokens a client has), `abort_request`,
`request_info`; `migrate_out`, `list_migrations` (source); `migration_attach_prefix`, `migration_reserve`,
`migration_receive`, `migration_commit`, `migration_abort` (destination); `scale_experts` (an MoE instance's EP
size: experts on expert-worker actors, instance/ep/).
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque

from instance.backends import create_backend
from instance.config import EngineConfig
from instance.ep.dispatch import ExpertDispatcher
from instance.ep.pool import WorkerPool
from instance.ep.placement import rank_loads
from instance.ep.scaler import ExpertScaleError, ExpertScaler, ScaleReport, placement_lines
from instance.limits import REAP_INTERVAL_S, RECENT_MIGRATIONS_PER_INSTANCE
from instance.messages import ExpertRankStatus, ExpertStatus, InstanceInfo, InstanceStatus
from instance.migration_ports import EngineDestinationPort, EngineSourcePort
from instance.request import RequestOutput
from instance.sampling import SamplingParams
from instance.step_loop import StepLoop
from instance.streams import StreamRegistry
from migration.destination import MigrationDestination
from migration.protocol import MigrationConfig, MigrationRecord, MigrationState
from migration.source import migrate_out
from migration.transport import create_transport
from rpc import ActorDead, ActorTimeout, BackgroundTasks, Deadlines
from rpc.call import node_identity
from rpc.expert import ExpertWorkerClient
from rpc.frontend import FrontendClient
from rpc.instance import InstanceClient

log = logging.getLogger(__name__)


class InstanceActor:
    def __init__(self, instance_id: str, engine_config: dict, num_threads: int | None = None,
                 migration_config: dict | None = None, deadlines: dict | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.instance_id = instance_id
        self.deadlines = Deadlines(**(deadlines or {}))
        config = EngineConfig(**engine_config)
        self.engine = create_backend(config)
        node_id, node_ip = node_identity()
        self.info = InstanceInfo(instance_id=instance_id, node_id=node_id, node_ip=node_ip,
                                 model=self.engine.model_name, max_model_len=self.engine.max_model_len,
                                 vocab_size=self.engine.vocab_size, pid=os.getpid(), backend=self.engine.kind)
        self.migration = MigrationConfig(**(migration_config or {}))
        self.transport = create_transport(self.migration.transport)
        self.streams = StreamRegistry(instance_id)
        self.steps = StepLoop(self.engine, instance_id, deliver=self._deliver, refresh=self._refresh,
                              on_failure=self._abort_all)
        self.source = EngineSourcePort(self.engine, self.steps, self.streams)
        self.incoming = MigrationDestination(
            EngineDestinationPort(self.engine, self.steps, self.streams, moved_in=self._moved_in),
            self.migration, self.transport.receive)
        self.outgoing: dict[str, MigrationRecord] = {}          # request id -> its migration in flight
        self.recent: deque[MigrationRecord] = deque(maxlen=RECENT_MIGRATIONS_PER_INSTANCE)
        self.tasks = BackgroundTasks(f"instance {instance_id}")
        self.me: InstanceClient | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.experts = self._expert_parallel(config)
        self._status = self._snapshot()

    def _expert_parallel(self, config: EngineConfig) -> ExpertScaler | None:
        """An MoE model's experts behind the EP dispatcher (at EP size 1 until start), with a pool of workers."""
        blocks = self.engine.moe_blocks() if hasattr(self.engine, "moe_blocks") else {}
        if not blocks:
            return None
        ep = config.ep
        dispatcher = ExpertDispatcher(blocks, on_lost=self._expert_lost,
                                      is_lost=lambda e: isinstance(e, (ActorDead, ActorTimeout)))
        pool = WorkerPool(self.instance_id, ep.warm_workers, lambda name: ExpertWorkerClient.create(
            name, ep.worker_num_cpus, self.deadlines, ep.layer_timeout_s, ep.copy_timeout_s))
        return ExpertScaler(self.instance_id, dispatcher, pool, self.steps.between_steps, ep)

    # ----- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> InstanceInfo:
        """Start the step loop (idempotent) and say what this instance serves."""
        if self.me is None:
            self.me = InstanceClient.current(self.instance_id, self.deadlines)
            self.tasks.spawn("step loop", self.steps.run())
            self.tasks.spawn("reaper", self._reap_forever())
            self._loop = asyncio.get_running_loop()
            if self.experts is not None:
                self.tasks.spawn("expert worker pool", self.experts.pool.fill())
                self.tasks.spawn("expert checksums", asyncio.to_thread(self.experts.reference_sums))
                size = self.experts.config.size
                if size > 1:
                    report = await self.experts.scale_to(size)
                    if not report.ok:
                        raise RuntimeError(f"instance {self.instance_id}: could not start at EP size {size}: "
                                           f"{report.result}")
            log.info("instance %s serving %s (max_model_len %d)", self.instance_id, self.info.model,
                     self.info.max_model_len)
        return self.info

    async def stop(self) -> None:
        self._stopping = True
        self.steps.stop()
        if self.experts is not None:
            self.experts.pool.close()
            for worker in self.experts.dispatcher.workers.values():
                worker.kill()

    async def get_status(self) -> InstanceStatus:
        return self._status

    async def check_integrity(self) -> None:
        await self.steps.between_steps(self.engine.check_integrity)

    # ----- requests ------------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          priority: int, sink: FrontendClient) -> int:
        """Queue a request whose tokens go to `sink`. Returns the step index it was accepted at."""
        self.engine.validate(prompt_token_ids, params, priority)   # raises InvalidRequestError at once

        def add():
            self.engine.add_request(request_id, prompt_token_ids=prompt_token_ids, params=params,
                                    priority=priority)
            self.streams.attach(request_id, sink)
            return self.steps.steps

        return await self.steps.between_steps(add)

    async def recover_request(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                              params: SamplingParams, seed: int, priority: int, text_emitted: int,
                              sink: FrontendClient, next_seq: int) -> int:
        """Take over a request from a dead instance: re-prefill what its client has, stream on from next_seq."""
        def recover():
            self.engine.resume_from_tokens(request_id, prompt_token_ids, output_token_ids, params, seed, priority,
                                           text_emitted)
            self.streams.attach(request_id, sink, next_seq)
            return self.steps.steps

        return await self.steps.between_steps(recover)

    async def abort_request(self, request_id: str) -> bool:
        def abort():
            self.streams.forget(request_id)
            return self.engine.abort(request_id)

        return await self.steps.between_steps(abort)

    async def request_info(self, request_id: str):
        """Where one request stands (None if it is not here); a read, so it does not wait for the step."""
        return self.engine.request_info(request_id)

    # ----- expert parallelism --------------------------------------------------------------------------------
    async def scale_experts(self, ep_size: int, dry_run: bool = False) -> ScaleReport:
        """Move to EP size `ep_size` while serving (see instance/ep/scaler.py); a report, whether it switched or
        rolled back. ExpertScaleError (FAILED_PRECONDITION) on a dense model, (INVALID_ARGUMENT) out of range."""
        if self.experts is None:
            raise ExpertScaleError("FAILED_PRECONDITION", f"{self.instance_id} serves {self.info.model}, a dense "
                                   f"model; expert parallelism needs an MoE model (e.g. tiny-moe, smollm2-135m-moe)")
        try:
            return await self.experts.scale_to(ep_size, dry_run)
        finally:
            self.steps.nudge()

    def _expert_lost(self, rank: str, why: str) -> None:
        """From the engine thread: a worker was lost mid-step; repair the EP size on the event loop."""
        if self._loop is not None and not self._stopping:
            self._loop.call_soon_threadsafe(lambda: self.tasks.spawn(f"repair EP after {rank}",
                                                                     self.experts.repair()))

    def _expert_status(self) -> ExpertStatus | None:
        x = self.experts
        if x is None:
            return None
        d = x.dispatcher
        shares = rank_loads(d.placement, d.observed_load())
        lines = placement_lines(d)
        ranks = tuple(ExpertRankStatus(r, len(d.placement.experts_of(r)), shares.get(r, 0.0),
                                       os.getpid() if r == "leader" else x.pool.pids.get(r, 0), lines.get(r, ()))
                      for r in d.placement.ranks())
        last = ""
        if x.last is not None:
            last = f"EP {x.last.previous} -> {x.last.ep_size} {x.last.result} ({x.last.total_ms:.0f} ms)"
        return ExpertStatus(d.ep_size, x.target, x.config.max_size, ranks, len(x.pool.idle), x.in_flight, last,
                            d.remote_ms_per_layer(), len(d.lost), tuple(x.pool.pids.get(w.name, 0) for w in x.pool.idle))

    # ----- migration: source half ---------------------------------------------------------------------------
    async def migrate_out(self, request_id: str, dst: InstanceClient, migration_id: str | None = None,
                          handoff: bool = False) -> MigrationRecord:
        """Move one request to `dst`. Returns the final record; the request stays here unless committed.
        `handoff`: a prefill-to-decode hand-over (it may start during the prefill; it leaves after the first
        token)."""
        record = MigrationRecord(migration_id or uuid.uuid4().hex[:12], request_id, self.instance_id,
                                 dst.instance_id)
        if request_id in self.outgoing:
            record.state, record.reason = MigrationState.ABORTED_SRC, "a migration of this request is in flight"
        elif len(self.outgoing) >= self.migration.max_concurrent:
            record.state = MigrationState.ABORTED_SRC
            record.reason = f"{len(self.outgoing)} outgoing migrations already (max_concurrent)"
        elif dst.instance_id == self.instance_id:
            record.state, record.reason = MigrationState.ABORTED_SRC, "source and destination are the same"
        else:
            self.outgoing[request_id] = record
            try:
                await migrate_out(self.source, dst.as_destination(self.migration.call_timeout_s), self.transport,
                                  record, self.migration, handoff)
            finally:
                del self.outgoing[request_id]
                self.steps.nudge()              # the status counts migrations in flight: refresh it
        self.recent.append(record)
        return record

    async def list_migrations(self) -> list[MigrationRecord]:
        return [*self.outgoing.values(), *self.recent]

    # ----- migration: destination half ----------------------------------------------------------------------
    async def migration_attach_prefix(self, migration_id: str, request_id: str, src: str,
                                      hashes: list[int]) -> int:
        try:
            return await self.incoming.attach_prefix(migration_id, request_id, src, hashes)
        finally:
            self.steps.nudge()

    async def migration_reserve(self, migration_id: str, request_id: str, src: str, n: int) -> int:
        try:
            return await self.incoming.reserve(migration_id, request_id, src, n)
        finally:
            self.steps.nudge()

    async def migration_receive(self, migration_id: str, first: int, payload) -> None:
        await self.incoming.receive(migration_id, first, payload)

    async def migration_commit(self, migration_id: str, state, sink: FrontendClient | None, next_seq: int) -> None:
        try:
            await self.incoming.commit(migration_id, state, sink, next_seq)
        finally:
            self.steps.nudge()

    async def migration_abort(self, migration_id: str) -> None:
        try:
            await self.incoming.abort(migration_id)
        finally:
            self.steps.nudge()

    # ----- what the step loop calls --------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for sink, chunks in self.streams.chunks(outputs).items():
            sink.push_chunks(chunks)

    def _refresh(self) -> None:
        self._status = self._snapshot()

    def _abort_all(self) -> None:
        for sink, chunks in self.streams.abort_all().items():
            sink.push_chunks(chunks)
        for info in self.engine.list_requests():
            self.engine.abort(info.request_id)

    def _moved_in(self, request_id: str, sink: FrontendClient) -> None:
        """A migration committed here: the request's frontend sends its aborts here from now on."""
        sink.request_moved(request_id, self.me)

    def _snapshot(self) -> InstanceStatus:
        return InstanceStatus(self.instance_id, self.engine.load(), self.steps.steps, len(self.streams),
                              requests=tuple(self.engine.list_requests()),
                              migrations_out=len(self.outgoing), migrations_in=len(self.incoming.inbound),
                              experts=self._expert_status())

    # ----- housekeeping --------------------------------------------------------------------------------------
    async def _reap_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(REAP_INTERVAL_S)
            for name, job in (("stale migrations", self.incoming.reap), ("dead frontends", self._reap_sinks)):
                try:
                    await job()
                except Exception:  # noqa: BLE001 - keep reaping
                    log.exception("instance %s: reaping %s failed", self.instance_id, name)
            self.steps.nudge()

    async def _reap_sinks(self) -> None:
        """A frontend that died leaves requests nobody reads: abort them and free their blocks."""
        sinks = self.streams.sinks()
        pings = await asyncio.gather(*(s.ping() for s in sinks), return_exceptions=True)
        for sink, result in zip(sinks, pings):
            if isinstance(result, ActorDead):
                orphans = self.streams.requests_of(sink)
                log.warning("instance %s: frontend %s of %d requests is gone; aborting them", self.instance_id,
                            sink.name, len(orphans))
                for rid in orphans:
                    await self.abort_request(rid)
