"""InstanceActor: one serving instance as a Ray actor around one engine.

The engine steps in a worker thread, so the actor's own RPCs (add, abort, load, migration) are answered
while a step runs. Everything that changes the engine runs on the event loop between two steps, never
during one. After every step the new tokens go straight to the frontend that owns each request
(`sink.push_chunks`), never through the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ray

from instance.backend import create_backend
from instance.config import EngineConfig
from instance.messages import InstanceInfo, InstanceStatus, TokenChunk
from instance.request import RequestOutput
from instance.sampling import SamplingParams

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0   # a command waits at most one (long) step plus the queue before it


class InstanceActor:
    def __init__(self, instance_id: str, engine_config: dict, num_threads: int | None = None):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        self.instance_id = instance_id
        self.engine = create_backend(EngineConfig(**engine_config))
        ctx = ray.get_runtime_context()
        self.info = InstanceInfo(instance_id=instance_id, node_id=ctx.get_node_id(),
                                 node_ip=ray.util.get_node_ip_address(), model=self.engine.model_name,
                                 max_model_len=self.engine.max_model_len,
                                 vocab_size=self.engine.arch.vocab_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{instance_id}-engine")
        self._commands: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._sinks: dict[str, Any] = {}      # request id -> frontend actor handle
        self._seq: dict[str, int] = {}        # request id -> seq of its next chunk
        self._steps = 0
        self._status = self._snapshot()
        self._stopping = False

    # ----- lifecycle -------------------------------------------------------------------------------------------
    async def start(self) -> InstanceInfo:
        """Start the step loop (idempotent) and say what this instance serves."""
        if self._loop_task is None:
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
            log.info("instance %s serving %s (max_model_len %d)", self.instance_id, self.info.model,
                     self.info.max_model_len)
        return self.info

    async def stop(self) -> None:
        self._stopping = True
        if self._wake:
            self._wake.set()

    # ----- requests ------------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          priority: int, sink: Any) -> int:
        """Queue a request whose tokens go to `sink`. Returns the step index it was accepted at."""
        self.engine.validate(prompt_token_ids, params, priority)   # raises InvalidRequestError at once

        def add():
            self.engine.add_request(request_id, prompt_token_ids=prompt_token_ids, params=params,
                                    priority=priority)
            self._sinks[request_id] = sink
            self._seq[request_id] = 0
            return self._steps

        return await self._between_steps(add)

    async def abort(self, request_id: str) -> bool:
        def abort():
            self._forget(request_id)
            return self.engine.abort(request_id)

        return await self._between_steps(abort)

    async def get_status(self) -> InstanceStatus:
        return self._status

    async def check_integrity(self) -> None:
        await self._between_steps(self.engine.check_integrity)

    async def list_requests(self) -> list[str]:
        return await self._between_steps(lambda: sorted(self._sinks))

    # ----- the step loop -------------------------------------------------------------------------------------
    async def _between_steps(self, fn: Callable[[], Any]) -> Any:
        if self._loop_task is None:
            raise RuntimeError(f"instance {self.instance_id} is not started")
        future = asyncio.get_running_loop().create_future()
        self._commands.append((fn, future))
        self._wake.set()
        return await asyncio.wait_for(future, COMMAND_TIMEOUT_S)

    def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        for fn, future in commands:
            if future.done():       # its caller timed out
                continue
            try:
                future.set_result(fn())
            except Exception as e:  # noqa: BLE001 - the caller gets the error, the loop goes on
                future.set_exception(e)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self._apply_commands()
            if not self.engine.has_unfinished():
                self._status = self._snapshot()
                self._wake.clear()
                if not self._commands:
                    await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception:
                log.exception("instance %s: engine step failed; aborting its requests", self.instance_id)
                self._abort_all()
                continue
            self._steps += 1
            self._status = self._snapshot()
            self._deliver(outputs)
            await asyncio.sleep(0)   # let queued RPCs run before the next step

    def _snapshot(self) -> InstanceStatus:
        return InstanceStatus(self.instance_id, self.engine.load(), self._steps, len(self._sinks))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_sink: dict[Any, list[TokenChunk]] = {}
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            seq = self._seq[out.request_id]
            self._seq[out.request_id] = seq + 1
            by_sink.setdefault(sink, []).append(TokenChunk(
                request_id=out.request_id, seq=seq, token_ids=tuple(out.new_token_ids), text=out.text_delta,
                instance_id=self.instance_id, finish_reason=out.finish_reason,
                prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens))
            if out.finished:
                self._forget(out.request_id)
        for sink, chunks in by_sink.items():
            sink.push_chunks.remote(chunks)

    def _forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._seq.pop(request_id, None)

    def _abort_all(self) -> None:
        for rid, sink in list(self._sinks.items()):
            sink.push_chunks.remote([TokenChunk(rid, self._seq[rid], (), "", self.instance_id, "abort")])
            self.engine.abort(rid)
            self._forget(rid)


def instance_actor_class():
    """The Ray actor class (created lazily so importing this module does not need a Ray runtime)."""
    return ray.remote(InstanceActor)

