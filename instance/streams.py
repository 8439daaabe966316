"""Where each request's tokens go: the sink of its stream (the frontend that owns it) and the seq of its next
chunk. Ray-free: a sink is whatever the actor pushes chunks to (a `FrontendClient` in production).
"""

from __future__ import annotations

import time
from typing import Any

from instance.messages import TokenChunk
from instance.request import RequestOutput


class StreamRegistry:
    def __init__(self, instance_id: str):
        self.instance_id = instance_id
        self._sinks: dict[str, Any] = {}      # request id -> sink
        self._seq: dict[str, int] = {}        # request id -> seq of its next chunk

    def __len__(self) -> int:
        return len(self._sinks)

    def attach(self, request_id: str, sink: Any, next_seq: int = 0) -> None:
        self._sinks[request_id] = sink
        self._seq[request_id] = next_seq

    def route(self, request_id: str) -> tuple[Any, int]:
        """(sink, seq of the next chunk) of a request; (None, 0) for one without a stream here."""
        return self._sinks.get(request_id), self._seq.get(request_id, 0)

    def forget(self, request_id: str) -> None:
        self._sinks.pop(request_id, None)
        self._seq.pop(request_id, None)

    def sinks(self) -> list[Any]:
        """Every distinct sink, once."""
        return list({s: None for s in self._sinks.values() if s is not None})

    def requests_of(self, sink: Any) -> list[str]:
        return [rid for rid, s in self._sinks.items() if s == sink]

    def chunks(self, outputs: list[RequestOutput]) -> dict[Any, list[TokenChunk]]:
        """One step's outputs as chunks numbered in each stream's order, grouped by sink; finished streams are
        forgotten."""
        by_sink: dict[Any, list[TokenChunk]] = {}
        now = time.time()
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            seq = self._seq[out.request_id]
            self._seq[out.request_id] = seq + 1
            by_sink.setdefault(sink, []).append(TokenChunk(
                request_id=out.request_id, seq=seq, token_ids=tuple(out.new_token_ids), text=out.text_delta,
                instance_id=self.instance_id, finish_reason=out.finish_reason,
                prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens, produced_at=now))
            if out.finished:
                self.forget(out.request_id)
        return by_sink

    def abort_all(self) -> dict[Any, list[TokenChunk]]:
        """A final "abort" chunk for every stream, grouped by sink; the registry is empty after."""
        by_sink: dict[Any, list[TokenChunk]] = {}
        for rid, sink in self._sinks.items():
            by_sink.setdefault(sink, []).append(TokenChunk(rid, self._seq[rid], (), "", self.instance_id, "abort"))
        self._sinks.clear()
        self._seq.clear()
        return by_sink
