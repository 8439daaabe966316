"""A request inside one engine: explicit counters plus one status enum.

Also the incremental detokenizer (UTF-8 safe text deltas, stop strings), the per-step output a caller sees,
and `RequestState`, everything a request needs to resume on another engine.
"""

from __future__ import annotations

import codecs
import enum
from dataclasses import dataclass, field
from typing import Callable

from instance.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"        # queued, or preempted and waiting to be recomputed
    RUNNING = "running"        # in the batch, holds blocks
    SUSPENDED = "suspended"    # taken out of the batch between two steps (migration), still holds its blocks
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens or max_model_len
    ABORT = "abort"


class Detokenizer:
    """Turns a stream of token ids into text deltas.

    Token bytes go through an incremental UTF-8 decoder, so a character split across tokens is emitted once
    it is complete. While stop strings are set, the last (longest stop − 1) characters are held back so a
    stop string is never half-streamed.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop: tuple[str, ...],
                 text: str = "", emitted: int = 0, pending: bytes = b""):
        self._token_bytes = token_bytes
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoder.setstate((pending, 0))
        self.text = text
        self.emitted = emitted

    @property
    def pending(self) -> bytes:
        return self._decoder.getstate()[0]

    def push(self, token_id: int) -> bool:
        """Add one token; True if a stop string is now complete (the text is cut before it)."""
        before = len(self.text)
        self.text += self._decoder.decode(self._token_bytes(token_id))
        if not self._stop:
            return False
        start = max(0, before - self._hold)
        hits = [p for p in (self.text.find(s, start) for s in self._stop) if p >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def flush(self) -> None:
        """The request ended without a stop string: bytes of an unfinished character become U+FFFD."""
        self.text += self._decoder.decode(b"", final=True)

    def delta(self, finished: bool) -> str:
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self._hold)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


@dataclass(eq=False)
class Request:
    request_id: str
    token_ids: list[int]            # prompt followed by output
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    priority: int                   # higher is served first
    arrival_time: float             # time.time(): wall clock, so a request moved across nodes keeps its place
    detok: Detokenizer
    eos_token_ids: frozenset[int]
    max_model_len: int
    num_computed_tokens: int = 0    # tokens whose keys and values are in this engine's cache
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    new_token_ids: list[int] = field(default_factory=list)   # produced since the last output was taken
    block_hashes: list[int] = field(default_factory=list)    # prefix-cache hashes of its full blocks so far
    num_cached_blocks: int = 0      # leading blocks already offered to the prefix cache
    num_cached_tokens: int = 0      # tokens its last admission found in the prefix cache (not computed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def sort_key(self) -> tuple[int, float]:
        """Queue order: higher priority first, then earlier arrival."""
        return (-self.priority, self.arrival_time)

    def append_token(self, token_id: int) -> None:
        """Record a sampled token and decide whether the request is done."""
        self.token_ids.append(token_id)
        self.new_token_ids.append(token_id)
        hit_stop_string = self.detok.push(token_id)
        p = self.params
        if hit_stop_string or token_id in p.stop_token_ids or (
                not p.ignore_eos and token_id in self.eos_token_ids):
            self.finish_reason = FinishReason.STOP
        elif self.num_output_tokens >= p.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = FinishReason.LENGTH
            self.detok.flush()
        if self.finish_reason is not None:
            self.status = RequestStatus.FINISHED

    def take_output(self) -> "RequestOutput":
        out = RequestOutput(
            request_id=self.request_id,
            new_token_ids=self.new_token_ids,
            text_delta=self.detok.delta(self.is_finished),
            finished=self.is_finished,
            finish_reason=self.finish_reason.value if self.finish_reason else None,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_output_tokens,
        )
        self.new_token_ids = []
        return out

    def to_state(self) -> "RequestState":
        return RequestState(
            request_id=self.request_id,
            token_ids=list(self.token_ids),
            num_prompt_tokens=self.num_prompt_tokens,
            num_computed_tokens=self.num_computed_tokens,
            params=self.params,
            seed=self.seed,
            sample_index=self.num_output_tokens,
            priority=self.priority,
            arrival_time=self.arrival_time,
            text=self.detok.text,
            text_emitted=self.detok.emitted,
            pending_bytes=self.detok.pending,
            num_preemptions=self.num_preemptions,
        )


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass(frozen=True)
class RequestState:
    """Everything a request needs to resume on another engine, besides its KV blocks."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int        # tokens whose KV blocks travel with the request
    params: SamplingParams
    seed: int
    sample_index: int               # index of the next output token's random draw (= outputs so far)
    priority: int
    arrival_time: float
    text: str                       # detokenized output so far
    text_emitted: int               # characters of `text` already streamed
    pending_bytes: bytes            # an unfinished UTF-8 character
    num_preemptions: int = 0
