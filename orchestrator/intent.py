"""The scheduler's target state as it keeps it in the state store: which instances it created (with their
state and role), the drains in progress, and the scale operation in progress.

Writes never stop serving: one that fails because the store is unreachable is kept, the newest value per
key, and written again by `flush()`, which the reconcile loop calls every round; so losing the store pauses
writes of intent, never serving. Reads (at start, to recover) go straight to the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from orchestrator.store import StateStore, StoreError

log = logging.getLogger(__name__)

_DELETE = None
_ABSENT = object()


@dataclass(frozen=True)
class StoreHealth:
    """How the state store looks from the scheduler: pushed to frontends with the table, shown by `tidal status`."""

    url: str
    reachable: bool
    error: str = ""                 # the last failure, while it is unreachable
    unwritten: int = 0              # intent records waiting to be written


class Intent:
    def __init__(self, store: StateStore):
        self.store = store
        self._unwritten: dict[str, dict | None] = {}      # key -> newest value not yet stored (None: delete)
        self._error = ""                                  # the last StoreError, cleared by the next success

    @property
    def url(self) -> str:
        return self.store.url

    @property
    def pending(self) -> bool:
        """Whether some intent is still to be written (the store was unreachable)."""
        return bool(self._unwritten)

    def health(self) -> StoreHealth:
        return StoreHealth(self.store.url, not self._error, self._error, len(self._unwritten))

    # ----- writes --------------------------------------------------------------------------------------------
    async def save_instance(self, instance_id: str, state: str, role: str) -> None:
        await self._write(f"instance/{instance_id}", {"instance_id": instance_id, "state": state, "role": role})

    async def start_drain(self, instance_id: str) -> None:
        await self._write(f"op/drain/{instance_id}", {"instance_id": instance_id, "started_at": time.time()})

    async def end_drain(self, instance_id: str) -> None:
        await self._write(f"op/drain/{instance_id}", _DELETE)

    async def forget_instance(self, instance_id: str) -> None:
        """A removed instance is no longer part of the deployment."""
        await self._write(f"instance/{instance_id}", _DELETE)

    async def start_scale(self, target: int, adding: list[str], removing: str | None, reason: str) -> None:
        await self._write("op/scale", {"target": target, "adding": adding, "removing": removing, "reason": reason,
                                       "started_at": time.time()})

    async def end_scale(self) -> None:
        await self._write("op/scale", _DELETE)

    async def flush(self) -> None:
        """Write what earlier writes could not, oldest first; stops at the first failure (the store is still
        down) and leaves the rest for the next call."""
        todo = list(self._unwritten.items())
        for key, value in todo:
            if self._unwritten.get(key, _ABSENT) is not value:
                continue                    # a newer write of this key came in meanwhile: it wins
            if not await self._write(key, value):
                return
        if todo and not self._unwritten:
            log.info("state store %s reachable again: %d writes caught up", self.store.url, len(todo))

    async def _write(self, key: str, value: dict | None) -> bool:
        try:
            if value is _DELETE:
                await asyncio.to_thread(self.store.delete, key)
            else:
                await asyncio.to_thread(self.store.put, key, value)
        except StoreError as e:
            if not self._unwritten:
                log.warning("state store unreachable; serving goes on and intent is written once it is back: %s",
                            e)
            self._unwritten[key] = value
            self._error = str(e)
            return False
        self._error = ""
        if self._unwritten.get(key, _ABSENT) is value:
            del self._unwritten[key]
        return True

    # ----- reads ---------------------------------------------------------------------------------------------
    async def saved_instances(self) -> dict[str, dict]:
        return await self._read("instance/")

    async def saved_drains(self) -> list[str]:
        return [key.split("/")[-1] for key in await self._read("op/drain/")]

    async def saved_scale(self) -> dict | None:
        """The scale operation a previous scheduler left unfinished, if any."""
        return (await self._read("op/scale")).get("op/scale")

    async def _read(self, prefix: str) -> dict[str, dict]:
        try:
            found = await asyncio.to_thread(self.store.scan, prefix)
        except StoreError as e:
            self._error = str(e)
            raise
        self._error = ""
        return found

    async def forget_all(self) -> None:
        """Delete every key of the deployment (the deployment is being taken down)."""
        self._unwritten.clear()
        for key in await asyncio.to_thread(self.store.scan, ""):
            await asyncio.to_thread(self.store.delete, key)
