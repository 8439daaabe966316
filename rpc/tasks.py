"""Tasks a component starts and does not await: kept until they end (so none is garbage-collected in flight),
and each failure logged with the task's name, never lost."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable

log = logging.getLogger(__name__)


class BackgroundTasks:
    def __init__(self, owner: str):
        self.owner = owner
        self._tasks: set[asyncio.Task] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, name: str, work: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        task.set_name(f"{self.owner}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._ended)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _ended(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("%s failed: %s", task.get_name(), err, exc_info=err)
