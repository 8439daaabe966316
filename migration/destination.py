"""The destination half of a live migration: reservations, imports, commit, and the watchdog that frees
reservations a silent source left behind."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from instance.limits import COMMITTED_MIGRATION_MEMORY_S
from migration.protocol import MigrationAborted, MigrationConfig, MigrationState

log = logging.getLogger(__name__)


class DestinationPort(Protocol):
    """What the destination half needs from its instance (`instance.migration_ports.EngineDestinationPort`).
    One import per migration, keyed by the migration id, collects the request's blocks."""

    async def attach_prefix(self, import_id: str, hashes: list[int]) -> int:
        """Begin the import with the leading blocks of `hashes` cached here; how many."""

    async def reserve(self, import_id: str, n: int) -> int:
        """n more blocks for the import; the index within the request of the first of them."""

    async def write(self, import_id: str, first: int, blocks: Any) -> None: ...

    async def cancel(self, import_id: str) -> None: ...

    async def admit(self, import_id: str, state: Any, sink: Any, next_seq: int) -> None: ...

    async def abort_request(self, request_id: str) -> bool: ...


@dataclass
class Inbound:
    migration_id: str
    request_id: str
    src: str
    num_blocks: int = 0             # reserved for it so far
    last_heard: float = 0.0


class MigrationDestination:
    def __init__(self, port: DestinationPort, config: MigrationConfig, receive: Callable[[Any], Any],
                 clock: Callable[[], float] = time.monotonic):
        self.port = port
        self.config = config
        self.receive_payload = receive
        self.clock = clock
        self.inbound: dict[str, Inbound] = {}
        self.committed: dict[str, tuple[str, float]] = {}    # migration id -> (request id, when)

    async def attach_prefix(self, migration_id: str, request_id: str, src: str, hashes: list[int]) -> int:
        """Begin a migration with the blocks of the request's prefix cached here (the source copies the rest)."""
        if migration_id in self.inbound:
            raise MigrationAborted(MigrationState.ABORTED_DST, f"migration {migration_id} has begun already")
        inbound = self._begin(migration_id, request_id, src)
        try:
            found = await self.port.attach_prefix(migration_id, list(hashes))
        except Exception as e:
            self.inbound.pop(migration_id, None)
            raise MigrationAborted(MigrationState.ABORTED_DST, f"cannot look up the cached prefix: {e}") from None
        if self.inbound.get(migration_id) is not inbound:     # reaped or aborted meanwhile
            await self.port.cancel(migration_id)
            raise MigrationAborted(MigrationState.ABORTED_DST, f"migration {migration_id} expired while attaching")
        inbound.num_blocks = found
        inbound.last_heard = self.clock()
        if found:
            log.info("migration %s: %d of %d offered blocks of %s are cached here, not copied", migration_id,
                     found, len(hashes), request_id)
        return found

    def _begin(self, migration_id: str, request_id: str, src: str) -> Inbound:
        if migration_id in self.committed:
            raise MigrationAborted(MigrationState.ABORTED_DST, "migration already committed")
        if len(self.inbound) >= self.config.max_concurrent:
            raise MigrationAborted(MigrationState.ABORTED_DST,
                                   f"{len(self.inbound)} incoming migrations already (max_concurrent)")
        inbound = self.inbound[migration_id] = Inbound(migration_id, request_id, src, last_heard=self.clock())
        return inbound

    async def reserve(self, migration_id: str, request_id: str, src: str, n: int) -> int:
        inbound = self.inbound.get(migration_id)
        if inbound is None:
            inbound = self._begin(migration_id, request_id, src)
        inbound.last_heard = self.clock()
        try:
            first = await self.port.reserve(migration_id, n)
        except Exception as e:
            if not inbound.num_blocks:
                self.inbound.pop(migration_id, None)
            raise MigrationAborted(MigrationState.ABORTED_DST, f"cannot reserve {n} blocks: {e}") from None
        if self.inbound.get(migration_id) is not inbound:     # reaped or aborted while we waited for the blocks
            await self.port.cancel(migration_id)
            raise MigrationAborted(MigrationState.ABORTED_DST, f"migration {migration_id} expired while reserving")
        inbound.num_blocks = first + n
        inbound.last_heard = self.clock()
        return first

    async def receive(self, migration_id: str, first: int, payload: Any) -> None:
        inbound = self._get(migration_id)
        blocks = self.receive_payload(payload)
        if first < 0 or first + blocks.shape[2] > inbound.num_blocks:
            raise MigrationAborted(MigrationState.ABORTED_DST, f"blocks {first}..{first + blocks.shape[2] - 1} "
                                   f"sent, but only {inbound.num_blocks} were reserved")
        await self.port.write(migration_id, first, blocks)
        inbound.last_heard = self.clock()

    async def commit(self, migration_id: str, state: Any, sink: Any, next_seq: int) -> None:
        if migration_id in self.committed:
            return                                  # a retried commit: already done
        inbound = self.inbound.get(migration_id)
        if inbound is None and state.num_computed_tokens > 0:
            raise MigrationAborted(MigrationState.ABORTED_DST, f"unknown migration {migration_id}")
        await self.port.admit(migration_id, state, sink, next_seq)
        self.inbound.pop(migration_id, None)
        self.committed[migration_id] = (state.request_id, self.clock())
        log.info("migration %s committed: %s admitted with %d blocks", migration_id, state.request_id,
                 inbound.num_blocks if inbound else 0)

    async def abort(self, migration_id: str) -> None:
        """Undo whatever this migration left here: free a reservation, or stop a request it committed."""
        inbound = self.inbound.pop(migration_id, None)
        if inbound is not None and inbound.num_blocks:
            await self.port.cancel(migration_id)
            log.info("migration %s aborted: released %d reserved blocks", migration_id, inbound.num_blocks)
        committed = self.committed.pop(migration_id, None)
        if committed is not None:
            await self.port.abort_request(committed[0])
            log.warning("migration %s aborted after its commit: stopped %s here", migration_id, committed[0])

    async def reap(self) -> list[str]:
        """Free reservations whose source has been silent for longer than dst_idle_timeout_s."""
        now = self.clock()
        stale = [m for m, i in self.inbound.items() if now - i.last_heard > self.config.dst_idle_timeout_s]
        for mid in stale:
            inbound = self.inbound.pop(mid)
            if inbound.num_blocks:
                await self.port.cancel(mid)
            log.warning("migration %s: source %s silent for %.1f s; released %d reserved blocks", mid, inbound.src,
                        now - inbound.last_heard, inbound.num_blocks)
        for mid in [m for m, (_, t) in self.committed.items() if now - t > COMMITTED_MIGRATION_MEMORY_S]:
            del self.committed[mid]
        return stale

    def _get(self, migration_id: str) -> Inbound:
        inbound = self.inbound.get(migration_id)
        if inbound is None:
            raise MigrationAborted(MigrationState.ABORTED_DST, f"unknown or expired migration {migration_id}")
        return inbound
