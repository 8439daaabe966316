"""Expert workers kept started and empty, so that a scale-up does not wait for a process to start and import
torch (the analogue of ElasticMoE's pre-initialised instances). Ray-free: `start(name)` makes a worker
handle (rpc.expert.ExpertWorkerClient on Ray)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, prefix: str, warm: int, start: Callable[[str], Any]):
        self.prefix, self.warm, self._start = prefix, warm, start
        self.idle: list[Any] = []
        self.pids: dict[str, int] = {}
        self._starting = 0
        self._names = itertools.count()
        self._closed = False

    async def _new(self) -> Any:
        name = f"{self.prefix}-w{next(self._names)}"
        handle = self._start(name)
        try:
            self.pids[name] = await handle.ping()
        except Exception:
            handle.kill()
            raise
        log.info("expert worker %s started (pid %d)", name, self.pids[name])
        return handle

    async def fill(self) -> None:
        """Start workers until `warm` are idle (or starting)."""
        while not self._closed and len(self.idle) + self._starting < self.warm:
            self._starting += 1
            try:
                handle = await self._new()
            finally:
                self._starting -= 1
            if self._closed:
                handle.kill()
                return
            self.idle.append(handle)

    async def take(self) -> Any:
        """An idle worker (trusted, not pinged: the copy into it is its first real call), else a new one."""
        if self.idle:
            return self.idle.pop(0)
        return await self._new()

    async def check(self, timeout_s: float = 5.0) -> int:
        """Ping the idle workers; stop those that do not answer (the next fill replaces them). Returns how
        many were stopped."""
        idle = list(self.idle)
        answers = await asyncio.gather(*(asyncio.wait_for(h.ping(), timeout_s) for h in idle),
                                       return_exceptions=True)
        dead = [h for h, a in zip(idle, answers) if isinstance(a, BaseException)]
        for h in dead:
            if h in self.idle:
                self.idle.remove(h)
            self.retire(h)
        if dead:
            log.warning("expert worker pool: %d idle workers did not answer and were stopped: %s", len(dead),
                        ", ".join(h.name for h in dead))
        return len(dead)

    def give_back(self, handle: Any) -> None:
        """A worker that holds no experts any more: kept idle while the pool is short, else stopped."""
        if not self._closed and len(self.idle) < self.warm:
            self.idle.append(handle)
        else:
            self.retire(handle)

    def retire(self, handle: Any) -> None:
        handle.kill()
        self.pids.pop(handle.name, None)

    def close(self) -> None:
        self._closed = True
        for h in self.idle:
            self.retire(h)
        self.idle = []
