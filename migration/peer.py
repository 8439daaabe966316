"""The destination instance as the source half calls it: Ray actor calls with a deadline on each."""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from migration.protocol import MigrationAborted, MigrationState


class RayDestinationPeer:
    def __init__(self, instance_id: str, actor: Any, timeout_s: float):
        self.instance_id = instance_id
        self.actor = actor
        self.timeout_s = timeout_s

    async def _call(self, method: str, *args) -> Any:
        try:
            return await asyncio.wait_for(getattr(self.actor, method).remote(*args), self.timeout_s)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, MigrationAborted):
                raise e.cause from None
            raise MigrationAborted(MigrationState.ABORTED_DST, f"{method} failed on {self.instance_id}: "
                                                               f"{e.cause!r}") from None
        except ray.exceptions.RayActorError:
            raise MigrationAborted(MigrationState.ABORTED_DST, f"destination {self.instance_id} died") from None
        except asyncio.TimeoutError:
            raise MigrationAborted(MigrationState.ABORTED_DST,
                                   f"{method} on {self.instance_id} timed out after {self.timeout_s:.0f} s") from None

    async def reserve(self, migration_id, request_id, src, n) -> list[int]:
        return await self._call("migration_reserve", migration_id, request_id, src, n)

    async def receive(self, migration_id, block_ids, payload) -> None:
        await self._call("migration_receive", migration_id, block_ids, payload)

    async def commit(self, migration_id, state, sink, next_seq) -> None:
        await self._call("migration_commit", migration_id, state, sink, next_seq)

    async def abort(self, migration_id) -> None:
        await self._call("migration_abort", migration_id)

    async def abort_request(self, request_id) -> None:
        await self._call("abort", request_id)
