"""Every call the control plane makes on an instance goes through `InstanceHandle`.

It owns the actor handle, the actor's name and the deadlines, so tests can swap in a fake and the
scheduler never blocks on an actor: each call returns an awaitable that fails after `timeout_s`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray


class InstanceHandle:
    def __init__(self, instance_id: str, actor: Any, timeout_s: float):
        self.instance_id = instance_id
        self.actor = actor
        self.timeout_s = timeout_s

    async def _call(self, method: str, *args, timeout_s: float | None = None) -> Any:
        ref = getattr(self.actor, method).remote(*args)
        return await asyncio.wait_for(ref, timeout_s or self.timeout_s)

    async def start(self, timeout_s: float):
        return await self._call("start", timeout_s=timeout_s)

    async def get_status(self):
        return await self._call("get_status")

    async def add_request(self, request_id, prompt_token_ids, params, priority, sink) -> int:
        return await self._call("add_request", request_id, prompt_token_ids, params, priority, sink)

    async def abort(self, request_id: str) -> bool:
        return await self._call("abort", request_id)

    async def check_integrity(self) -> None:
        return await self._call("check_integrity")

    async def stop(self) -> None:
        return await self._call("stop")

    def kill(self) -> None:
        ray.kill(self.actor, no_restart=True)
