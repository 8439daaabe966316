"""The frontends registered with the scheduler, and the instance table it pushes to them, with how the
control plane looks (`control()`: the state store's health, scaling) for `tidal status` and metrics.

A push that has not landed is not repeated (no pile-up); a frontend that is gone (`ActorDead`), or whose
pushes failed `MAX_PUSH_FAILURES` times in a row, is unregistered: a live frontend registers again as soon as
the table stops coming (`SCHEDULER_SILENCE_S`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Callable

from rpc import ActorDead
from rpc.frontend import FrontendClient

log = logging.getLogger(__name__)

MAX_PUSH_FAILURES = 10


@dataclass
class _Registered:
    client: FrontendClient
    push: asyncio.Future | None = None
    failures: int = 0               # pushes failed in a row


@dataclass(frozen=True)
class ControlState:
    """Pushed with every table."""

    store: Any                      # orchestrator.intent.StoreHealth
    scaling: Any = None             # orchestrator.scaling.ScalingStatus
    metrics: Any = None             # orchestrator.metrics.ControlMetrics: migrations, reconcile step times


class FrontendRegistry:
    def __init__(self, control: Callable[[], ControlState | None] = lambda: None):
        self.control = control
        self.frontends: dict[str, _Registered] = {}

    def register(self, name: str, client: FrontendClient) -> None:
        if name not in self.frontends:
            log.info("frontend %s registered", name)
        self.frontends[name] = _Registered(client)

    def broadcast(self, views: list) -> None:
        """Push the table (and the control state) to every frontend whose last push has landed."""
        control = self.control()
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
            fe.push = asyncio.ensure_future(fe.client.update_instances(views, control))

    async def push_now(self, views: list) -> None:
        """Push the table to every frontend and wait for it to land, so a command's effect on dispatch is in
        place when the command returns."""
        control = self.control()
        results = await asyncio.gather(*(fe.client.update_instances(views, control)
                                         for fe in self.frontends.values()), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.warning("pushing the instance table to a frontend failed: %s", r)
