"""The step loop of one instance: the engine steps in a worker thread; everything that changes the engine runs
on the event loop between two steps, never during one.

Ray-free (asyncio only): `InstanceActor` owns one, and the migration ports ask it to run their engine calls
`between_steps` (anything that reads or changes requests) or `beside_step` (copies of blocks no running
request can change, which need not wait for the step to end).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from instance.backend import EngineBackend
from instance.limits import BETWEEN_STEPS_TIMEOUT_S
from instance.request import RequestOutput

log = logging.getLogger(__name__)


class StepLoop:
    def __init__(self, engine: EngineBackend, name: str, deliver: Callable[[list[RequestOutput]], None],
                 refresh: Callable[[], None], on_failure: Callable[[], None]):
        """`deliver` gets each step's outputs; `refresh` runs after every step and whenever the engine goes
        idle; `on_failure` runs (between steps) after a step raised."""
        self.engine = engine
        self.name = name
        self.steps = 0                  # steps run so far
        self._deliver, self._refresh, self._on_failure = deliver, refresh, on_failure
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-engine")
        self._commands: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._wake is not None

    async def run(self) -> None:
        """Step while there is work, apply commands between steps; returns after `stop()`."""
        self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._refresh()
                self._wake.clear()
                if not self._commands:
                    await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception:
                log.exception("instance %s: engine step failed; aborting its requests", self.name)
                self._on_failure()
                continue
            self.steps += 1
            self._deliver(outputs)
            self._refresh()
            await asyncio.sleep(0)   # let queued RPCs run before the next step

    def stop(self) -> None:
        self._stopping = True
        self.nudge()

    def nudge(self) -> None:
        """Run the loop once more even if there is nothing to step: what the actor reports changed outside a
        step (a migration ended), and an idle loop refreshes only when woken."""
        if self._wake is not None:
            self._wake.set()

    async def between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the event loop once the running step (if any) has ended; its result or its exception.
        TimeoutError after BETWEEN_STEPS_TIMEOUT_S (fn then never runs)."""
        if self._wake is None:
            raise RuntimeError(f"instance {self.name} is not started")
        future = asyncio.get_running_loop().create_future()
        self._commands.append((fn, future))
        self._wake.set()
        return await asyncio.wait_for(future, BETWEEN_STEPS_TIMEOUT_S)

    async def beside_step(self, fn: Callable[..., Any], *args) -> Any:
        """Run fn in a thread of its own, while a step may be running."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for fn, future in commands:
            if future.done():       # its caller timed out
                continue
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - the caller gets the error, the loop goes on
                future.set_exception(e)
