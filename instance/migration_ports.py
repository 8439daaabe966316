"""The two halves of a live migration, as an instance implements them over its engine.

`EngineSourcePort` is what `migration.source.migrate_out` calls on the source instance, `EngineDestinationPort`
what `migration.destination.MigrationDestination` calls on the destination. Both speak only `EngineBackend`
and run every engine call through the instance's step loop: reads and changes between two steps, copies of
blocks no running request can change beside a running step. Ray-free, so the protocol tests run these very
classes over two in-process engines.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from instance.backend import EngineBackend, UnknownRequestError
from instance.kv_cache import blocks_for
from instance.streams import StreamRegistry
from migration.protocol import MigrationAborted, MigrationState, RequestSnapshot, Suspended


class Steps(Protocol):
    """Where engine calls run (`instance.step_loop.StepLoop`)."""

    def between_steps(self, fn: Callable[[], Any]) -> Awaitable[Any]: ...

    def beside_step(self, fn: Callable[..., Any], *args) -> Awaitable[Any]: ...


class EngineSourcePort:
    def __init__(self, engine: EngineBackend, steps: Steps, streams: StreamRegistry):
        self.engine, self.steps, self.streams = engine, steps, streams
        self.block_size = engine.block_size

    async def snapshot(self, request_id: str) -> RequestSnapshot | None:
        def read():
            info = self.engine.request_info(request_id)
            if info is None:
                return None
            return RequestSnapshot(info.num_computed_tokens, info.num_preemptions, info.status == "suspended",
                                   info.num_output_tokens, info.num_tokens)

        return await self.steps.between_steps(read)

    async def export(self, request_id: str, start: int, end: int) -> Any:
        try:
            return await self.steps.beside_step(self.engine.export_blocks, request_id, start, end)
        except UnknownRequestError:
            raise MigrationAborted(MigrationState.ENDED, "the request finished or was aborted") from None

    async def suspend(self, request_id: str, copied_blocks: int, preemptions: int) -> Suspended | None:
        def take():
            info = self.engine.request_info(request_id)
            if info is None:
                return None
            if info.num_preemptions != preemptions:
                raise MigrationAborted(MigrationState.ABORTED_SRC, "the request was preempted on the source")
            state = self.engine.suspend(request_id)
            needed = blocks_for(state.num_computed_tokens, self.block_size)
            rest = self.engine.export_blocks(request_id, copied_blocks, needed) if needed > copied_blocks else None
            sink, next_seq = self.streams.route(request_id)
            return Suspended(state, sink, next_seq, rest, max(0, needed - copied_blocks))

        return await self.steps.between_steps(take)

    async def prefix_hashes(self, request_id: str, num_blocks: int) -> list[int]:
        def read():
            try:
                return self.engine.prefix_hashes(request_id, num_blocks)
            except UnknownRequestError:
                raise MigrationAborted(MigrationState.ENDED, "the request finished or was aborted") from None

        return await self.steps.between_steps(read)

    async def resume(self, request_id: str) -> None:
        await self.steps.between_steps(
            lambda: self.engine.resume(request_id) if self.engine.request_info(request_id) else None)

    async def release(self, request_id: str) -> bool:
        def release():
            if self.engine.request_info(request_id) is None:
                return False                    # aborted by its client while suspended
            self.engine.free_suspended(request_id)
            self.streams.forget(request_id)
            return True

        return await self.steps.between_steps(release)


class EngineDestinationPort:
    def __init__(self, engine: EngineBackend, steps: Steps, streams: StreamRegistry,
                 moved_in: Callable[[str, Any], None] = lambda request_id, sink: None):
        """`moved_in(request_id, sink)` runs once a migrated request with a stream is admitted here."""
        self.engine, self.steps, self.streams, self.moved_in = engine, steps, streams, moved_in

    async def attach_prefix(self, import_id: str, hashes: list[int]) -> int:
        return await self.steps.between_steps(lambda: self.engine.attach_import_prefix(import_id, hashes))

    async def reserve(self, import_id: str, n: int) -> int:
        return await self.steps.between_steps(lambda: self.engine.reserve_import(import_id, n))

    async def write(self, import_id: str, first: int, blocks: Any) -> None:
        # reserved blocks belong to no running request: write them beside the running step
        await self.steps.beside_step(self.engine.write_import, import_id, first, blocks)

    async def cancel(self, import_id: str) -> None:
        await self.steps.between_steps(lambda: self.engine.cancel_import(import_id))

    async def admit(self, import_id: str, state: Any, sink: Any, next_seq: int) -> None:
        def admit():
            self.engine.commit_import(import_id, state)
            if sink is not None:
                self.streams.attach(state.request_id, sink, next_seq)
                self.moved_in(state.request_id, sink)

        await self.steps.between_steps(admit)

    async def abort_request(self, request_id: str) -> bool:
        def abort():
            self.streams.forget(request_id)
            return self.engine.abort(request_id)

        return await self.steps.between_steps(abort)
