"""InstanceActor: one serving instance as a Ray actor around one engine.

The engine steps in a worker thread, so the actor's own RPCs (add, abort, load, migration) are answered
while a step runs. Everything that changes the engine runs on the event loop between two steps, never
during one. After every step the new tokens go straight to the frontend that owns each request
(`sink.push_chunks`), never through the scheduler.

The actor composes: the engine (serving), the source half of outgoing migrations (`migrate_out`), and the
destination half of incoming ones (`migration_*`). It implements both halves' ports on top of the engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ray

from instance.backend import create_backend
from instance.config import EngineConfig
from instance.messages import InstanceInfo, InstanceStatus, TokenChunk
from instance.request import RequestOutput
from instance.sampling import SamplingParams
from migration.destination import MigrationDestination
from migration.peer import RayDestinationPeer
from migration.protocol import (MigrationAborted, MigrationConfig, MigrationRecord, MigrationState,
                                RequestSnapshot)
from migration.source import migrate_out
from migration.transport import create_transport

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0   # a command waits at most one (long) step plus the queue before it
REAP_INTERVAL_S = 1.0
SINK_PING_TIMEOUT_S = 5.0
RECENT_MIGRATIONS = 64


class InstanceActor:
    def __init__(self, instance_id: str, engine_config: dict, num_threads: int | None = None,
                 migration_config: dict | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.instance_id = instance_id
        self.engine = create_backend(EngineConfig(**engine_config))
        self.block_size = self.engine.config.block_size
        ctx = ray.get_runtime_context()
        self.info = InstanceInfo(instance_id=instance_id, node_id=ctx.get_node_id(),
                                 node_ip=ray.util.get_node_ip_address(), model=self.engine.model_name,
                                 max_model_len=self.engine.max_model_len,
                                 vocab_size=self.engine.arch.vocab_size, pid=os.getpid())
        self.migration = MigrationConfig(**(migration_config or {}))
        self.transport = create_transport(self.migration.transport)
        self.incoming = MigrationDestination(self, self.migration, self.transport.receive)
        self.outgoing: dict[str, MigrationRecord] = {}          # request id -> migration in flight
        self.recent: deque[MigrationRecord] = deque(maxlen=RECENT_MIGRATIONS)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{instance_id}-engine")
        self._commands: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._sinks: dict[str, Any] = {}      # request id -> frontend actor handle
        self._seq: dict[str, int] = {}        # request id -> seq of its next chunk
        self._steps = 0
        self._status = self._snapshot()
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> InstanceInfo:
        """Start the step loop (idempotent) and say what this instance serves."""
        if not self._tasks:
            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._run()), loop.create_task(self._reap_forever())]
            log.info("instance %s serving %s (max_model_len %d)", self.instance_id, self.info.model,
                     self.info.max_model_len)
        return self.info

    async def stop(self) -> None:
        self._stopping = True
        if self._wake:
            self._wake.set()

    # ----- requests ------------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          priority: int, sink: Any) -> int:
        """Queue a request whose tokens go to `sink`. Returns the step index it was accepted at."""
        self.engine.validate(prompt_token_ids, params, priority)   # raises InvalidRequestError at once

        def add():
            self.engine.add_request(request_id, prompt_token_ids=prompt_token_ids, params=params,
                                    priority=priority)
            self._sinks[request_id] = sink
            self._seq[request_id] = 0
            return self._steps

        return await self._between_steps(add)

    async def resume_request(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                             params: SamplingParams, seed: int, priority: int, text_emitted: int, sink: Any,
                             next_seq: int) -> int:
        """Take over a request from a dead instance: re-prefill what its client has, stream on from next_seq."""
        def resume():
            self.engine.resume_from_tokens(request_id, prompt_token_ids, output_token_ids, params, seed, priority,
                                           text_emitted)
            self._sinks[request_id] = sink
            self._seq[request_id] = next_seq
            return self._steps

        return await self._between_steps(resume)

    async def abort(self, request_id: str) -> bool:
        def abort():
            self._forget(request_id)
            return self.engine.abort(request_id)

        return await self._between_steps(abort)

    async def get_status(self) -> InstanceStatus:
        return self._status

    async def check_integrity(self) -> None:
        await self._between_steps(self.engine.check_integrity)

    async def list_requests(self) -> list[str]:
        return await self._between_steps(lambda: sorted(self._sinks))

    async def request_info(self, request_id: str):
        """Where one request stands (None if it is not here); a read, so it does not wait for the step."""
        return self.engine.request_info(request_id)

    # ----- migration: source half ---------------------------------------------------------------------------
    async def migrate_out(self, request_id: str, dst_id: str, dst_actor: Any,
                          migration_id: str | None = None, handoff: bool = False) -> MigrationRecord:
        """Move one request to `dst_actor`. Returns the final record; the request stays here unless committed.
        `handoff`: a prefill-to-decode hand-over (it may start during the prefill; it leaves after the first
        token)."""
        record = MigrationRecord(migration_id or uuid.uuid4().hex[:12], request_id, self.instance_id, dst_id)
        if request_id in self.outgoing:
            record.state, record.reason = MigrationState.ABORTED_SRC, "a migration of this request is in flight"
        elif len(self.outgoing) >= self.migration.max_concurrent:
            record.state = MigrationState.ABORTED_SRC
            record.reason = f"{len(self.outgoing)} outgoing migrations already (max_concurrent)"
        elif dst_id == self.instance_id:
            record.state, record.reason = MigrationState.ABORTED_SRC, "source and destination are the same"
        else:
            self.outgoing[request_id] = record
            try:
                peer = RayDestinationPeer(dst_id, dst_actor, self.migration.call_timeout_s)
                await migrate_out(self, peer, self.transport, record, self.migration, handoff)
            finally:
                del self.outgoing[request_id]
        self.recent.append(record)
        return record

    async def list_migrations(self) -> list[MigrationRecord]:
        return [*self.outgoing.values(), *self.recent]

    async def snapshot(self, request_id: str) -> RequestSnapshot | None:
        def read():
            info = self.engine.request_info(request_id, with_blocks=True)
            if info is None:
                return None
            return RequestSnapshot(info.num_computed_tokens, info.block_ids, info.num_preemptions,
                                   info.status == "suspended", info.num_output_tokens)

        return await self._between_steps(read)

    async def export(self, block_ids: list[int]):
        # full blocks no longer change: copy them beside the running step, not between steps
        return await asyncio.get_running_loop().run_in_executor(None, self.engine.export_blocks, block_ids)

    async def suspend(self, request_id: str, copied_blocks: int, preemptions: int):
        def take():
            info = self.engine.request_info(request_id, with_blocks=True)
            if info is None:
                return None
            if info.num_preemptions != preemptions:
                raise MigrationAborted(MigrationState.ABORTED_SRC, "the request was preempted on the source")
            state = self.engine.suspend(request_id)
            needed = -(-state.num_computed_tokens // self.block_size)
            rest = self.engine.export_blocks(list(info.block_ids[copied_blocks:needed])) \
                if needed > copied_blocks else None
            return state, self._sinks.get(request_id), self._seq.get(request_id, 0), rest

        return await self._between_steps(take)

    async def resume(self, request_id: str) -> None:
        await self._between_steps(lambda: self.engine.resume(request_id) if self.engine.request_info(request_id)
                                  else None)

    async def release(self, request_id: str) -> bool:
        def release():
            if self.engine.request_info(request_id) is None:
                return False                    # aborted by its client while suspended
            self.engine.free_suspended(request_id)
            self._forget(request_id)
            return True

        return await self._between_steps(release)

    # ----- migration: destination half ----------------------------------------------------------------------
    async def migration_reserve(self, migration_id: str, request_id: str, src: str, n: int) -> list[int]:
        return await self.incoming.reserve(migration_id, request_id, src, n)

    async def migration_receive(self, migration_id: str, block_ids: list[int], payload: Any) -> None:
        await self.incoming.receive(migration_id, block_ids, payload)

    async def migration_commit(self, migration_id: str, state: Any, sink: Any, next_seq: int) -> None:
        await self.incoming.commit(migration_id, state, sink, next_seq)

    async def migration_abort(self, migration_id: str) -> None:
        await self.incoming.abort(migration_id)

    async def reserve_blocks(self, n: int) -> list[int]:
        return await self._between_steps(lambda: self.engine.reserve_blocks(n))

    async def import_blocks(self, block_ids: list[int], blocks) -> None:
        # reserved blocks belong to no running request: write them beside the running step
        await asyncio.get_running_loop().run_in_executor(None, self.engine.import_blocks, block_ids, blocks)

    async def release_blocks(self, block_ids: list[int]) -> None:
        await self._between_steps(lambda: self.engine.release_reserved(block_ids))

    async def admit(self, state, block_ids: list[int], sink: Any, next_seq: int) -> None:
        def admit():
            self.engine.admit_migrated(state, block_ids)
            if sink is not None:
                self._sinks[state.request_id] = sink
                self._seq[state.request_id] = next_seq
                sink.request_moved.remote(state.request_id, self.instance_id,
                                          ray.get_runtime_context().current_actor)

        await self._between_steps(admit)

    async def abort_request(self, request_id: str) -> bool:
        return await self.abort(request_id)

    # ----- the step loop -------------------------------------------------------------------------------------
    async def _between_steps(self, fn: Callable[[], Any]) -> Any:
        if not self._tasks:
            raise RuntimeError(f"instance {self.instance_id} is not started")
        future = asyncio.get_running_loop().create_future()
        self._commands.append((fn, future))
        self._wake.set()
        return await asyncio.wait_for(future, COMMAND_TIMEOUT_S)

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for fn, future in commands:
            if future.done():       # its caller timed out
                continue
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - the caller gets the error, the loop goes on
                future.set_exception(e)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._status = self._snapshot()
                self._wake.clear()
                if not self._commands:
                    await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception:
                log.exception("instance %s: engine step failed; aborting its requests", self.instance_id)
                self._abort_all()
                continue
            self._steps += 1
            self._deliver(outputs)
            self._status = self._snapshot()
            await asyncio.sleep(0)   # let queued RPCs run before the next step

    async def _reap_forever(self) -> None:
        while not self._stopping:
            await asyncio.sleep(REAP_INTERVAL_S)
            for name, job in (("stale migrations", self.incoming.reap), ("dead frontends", self._reap_sinks)):
                try:
                    await job()
                except Exception:  # noqa: BLE001 - keep reaping
                    log.exception("instance %s: reaping %s failed", self.instance_id, name)

    async def _reap_sinks(self) -> None:
        """A frontend that died leaves requests nobody reads: abort them and free their blocks."""
        sinks = list({s: None for s in self._sinks.values() if s is not None})     # handles hash by actor id
        pings = await asyncio.gather(*(asyncio.wait_for(s.ping.remote(), SINK_PING_TIMEOUT_S) for s in sinks),
                                     return_exceptions=True)
        for sink, result in zip(sinks, pings):
            if isinstance(result, ray.exceptions.RayActorError):
                orphans = [rid for rid, s in self._sinks.items() if s == sink]
                log.warning("instance %s: the frontend of %d requests is gone; aborting them", self.instance_id,
                            len(orphans))
                for rid in orphans:
                    await self.abort(rid)

    def _snapshot(self) -> InstanceStatus:
        return InstanceStatus(self.instance_id, self.engine.load(), self._steps, len(self._sinks),
                              requests=tuple(self.engine.list_requests()), migrations_out=len(self.outgoing),
                              migrations_in=len(self.incoming.inbound))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_sink: dict[Any, list[TokenChunk]] = {}
        now = time.time()
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            seq = self._seq[out.request_id]
            self._seq[out.request_id] = seq + 1
            by_sink.setdefault(sink, []).append(TokenChunk(
                request_id=out.request_id, seq=seq, token_ids=tuple(out.new_token_ids), text=out.text_delta,
                instance_id=self.instance_id, finish_reason=out.finish_reason,
                prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens, produced_at=now))
            if out.finished:
                self._forget(out.request_id)
        for sink, chunks in by_sink.items():
            sink.push_chunks.remote(chunks)

    def _forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._seq.pop(request_id, None)

    def _abort_all(self) -> None:
        for rid, sink in list(self._sinks.items()):
            sink.push_chunks.remote([TokenChunk(rid, self._seq[rid], (), "", self.instance_id, "abort")])
            self.engine.abort(rid)
            self._forget(rid)
