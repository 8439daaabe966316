"""The frontends registered with the scheduler, and the instance table it pushes to them.

A push that has not landed is not repeated (no pile-up); a frontend that is gone (`ActorDead`), or whose
pushes failed `MAX_PUSH_FAILURES` times in a row, is unregistered: a live frontend registers again as soon as
the table stops coming (`SCHEDULER_SILENCE_S`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from rpc import ActorDead
from rpc.frontend import FrontendClient

log = logging.getLogger(__name__)

MAX_PUSH_FAILURES = 10


@dataclass
class _Registered:
    client: FrontendClient
    push: asyncio.Future | None = None
    failures: int = 0               # pushes failed in a row


class FrontendRegistry:
    def __init__(self):
        self.frontends: dict[str, _Registered] = {}

    def register(self, name: str, client: FrontendClient) -> None:
        if name not in self.frontends:
            log.info("frontend %s registered", name)
        self.frontends[name] = _Registered(client)

    def broadcast(self, views: list, store: Any = None) -> None:
        """Push the table (and how the state store looks) to every frontend whose last push has landed."""
        for name, fe in list(self.frontends.items()):
            if fe.push is not None:
                if not fe.push.done():
                    continue
                err = fe.push.exception()
                fe.failures = fe.failures + 1 if err is not None else 0
                if isinstance(err, ActorDead) or fe.failures >= MAX_PUSH_FAILURES:
                    log.warning("frontend %s is gone (%s); unregistering it", name, err)
                    del self.frontends[name]
                    continue
            fe.push = asyncio.ensure_future(fe.client.update_instances(views, store))

    async def push_now(self, views: list, store: Any = None) -> None:
        """Push the table to every frontend and wait for it to land, so a command's effect on dispatch is in
        place when the command returns."""
        results = await asyncio.gather(*(fe.client.update_instances(views, store)
                                         for fe in self.frontends.values()), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("pushing the instance table to a frontend failed: %s", r)
