"""Live migration of one running request: states, settings, the record both sides keep, and the two ports.

Multi-stage pre-copy (Llumnix). The source copies the request's full KV blocks to the destination while the
request keeps decoding, stage after stage, each stage copying what was computed since the last one. When
what is left is small (≤ `last_stage_max_blocks`) or the stage limit is reached, the source takes the
request out of its batch between two steps, copies the rest with the request's state, and the destination
commits and resumes it. The source frees its blocks only after the commit. Any failure before the commit
aborts the migration: the destination releases its reservation, the request goes on running on the source.

    PENDING ─▶ COPYING(stage k) ─▶ LAST_STAGE ─▶ COMMITTED
        └──────────┴──────────────────┴────────▶ ABORTED_SRC | ABORTED_DST | ENDED (request finished)

Hand-over (prefill/decode disaggregation) is the same protocol with one difference: it may start while the
request is still being prefilled. Pre-copy stages then copy the prompt's blocks as the prefill fills them,
and the last stage waits for the request's first token, whatever is left; so the copy overlaps the prefill
and the request leaves right after its first token.

Prefix caching: before the first copy the source offers the hashes of the request's computed full blocks
(`SourcePort.prefix_hashes`); the destination begins the import with the leading ones it already caches
(`DestinationPeer.attach_prefix`) and the copy starts after them. Either side without a prefix cache
answers [] / 0, and the migration copies everything as before.

This module only moves what it is told to move. Which request, from where to where, is policy
(orchestrator/policies/migration.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field


class MigrationState(str, enum.Enum):
    PENDING = "pending"
    COPYING = "copying"
    LAST_STAGE = "last_stage"
    COMMITTED = "committed"
    ABORTED_SRC = "aborted_src"     # the source gave up (request preempted, source-side error, timeout)
    ABORTED_DST = "aborted_dst"     # the destination refused or failed (out of blocks, dead, timeout)
    ENDED = "ended"                 # the request finished or was aborted during its migration

    @property
    def done(self) -> bool:
        return self in (MigrationState.COMMITTED, MigrationState.ABORTED_SRC, MigrationState.ABORTED_DST,
                        MigrationState.ENDED)


class MigrationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    last_stage_max_blocks: int = Field(4, ge=0, description="go to the last stage once at most this many remain")
    max_stages: int = Field(8, ge=0, description="pre-copy stages before the last stage is forced "
                                                 "(0: no pre-copy, a blocking copy of everything)")
    call_timeout_s: float = Field(10.0, gt=0, description="deadline of every call between the two halves")
    dst_idle_timeout_s: float = Field(15.0, gt=0,
                                      description="the destination frees a reservation the source left silent")
    max_concurrent: int = Field(4, ge=1, description="migrations in flight per instance, in and out each")
    stage_pause_s: float = Field(0.0, ge=0, description="pause between pre-copy stages, to cap interference")
    transport: str = Field("ray", description="how KV blocks travel: ray (object store)")
    handoff_prefill_timeout_s: float = Field(120.0, gt=0, description="a hand-over whose request has not "
                                             "finished its prefill this long after it started is abandoned")
    reserve_upfront: bool = Field(True, description="reserve on the destination, before the first copy, the "
                                  "blocks the whole request will need by the last stage (false: each stage "
                                  "reserves what it copies, and dispatches may fill the destination meanwhile)")
    reserve_growth_blocks: int = Field(2, ge=0, description="with reserve_upfront, blocks reserved beyond the "
                                       "request's current length for what it decodes during the copy")

    def deadline_s(self, handoff: bool = False) -> float:
        """How long one whole migration may take, start to commit or abort (the one place that says): every
        pre-copy stage and the last stage's four calls (suspend, reserve, send, commit) plus the release,
        each bounded by `call_timeout_s`; a hand-over may first wait for its request's prefill."""
        return self.call_timeout_s * (self.max_stages + 4) + (self.handoff_prefill_timeout_s if handoff else 0.0)


class MigrationAborted(Exception):
    """The migration did not commit; the request is still where it was (or has ended)."""

    def __init__(self, state: MigrationState, reason: str):
        super().__init__(f"{state.value}: {reason}")
        self.state = state
        self.reason = reason

    def __reduce__(self):    # crosses process boundaries inside Ray errors
        return MigrationAborted, (self.state, self.reason)


@dataclass
class MigrationRecord:
    """What one side knows about one migration; the report the scheduler and `tidal status` show."""

    migration_id: str
    request_id: str
    src: str
    dst: str
    state: MigrationState = MigrationState.PENDING
    stage: int = 0
    blocks_copied: int = 0
    reason: str = ""
    started_at: float = 0.0          # time.time()
    ended_at: float = 0.0
    downtime_ms: float = 0.0         # request out of the source's batch until the destination committed it
    tokens_at_start: int = 0
    stage_blocks: list[int] = field(default_factory=list)
    blocks_found: int = 0            # leading blocks the destination had cached already (not copied)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["state"] = self.state.value
        return d


@dataclass(frozen=True)
class RequestSnapshot:
    """Where a request stands on its source, read between two steps."""

    num_computed_tokens: int
    num_preemptions: int
    suspended: bool
    num_output_tokens: int
    num_tokens: int                # prompt + output so far: what the destination must hold at least


@dataclass(frozen=True)
class Suspended:
    """A request taken out of its source's batch for the last stage: what the destination needs to go on."""

    state: Any                     # instance.request.RequestState
    sink: Any                      # where its tokens go (the frontend that owns its stream), or None
    next_seq: int                  # seq of its next chunk
    rest: Any                      # KV of its computed blocks past those already copied, or None
    num_rest_blocks: int = 0


class SourcePort(Protocol):
    """What the source half needs from its instance (`instance.migration_ports.EngineSourcePort`)."""

    block_size: int

    async def snapshot(self, request_id: str) -> RequestSnapshot | None: ...

    async def export(self, request_id: str, start: int, end: int) -> Any:
        """KV of the request's blocks start..end-1 (full blocks: they no longer change)."""

    async def suspend(self, request_id: str, copied_blocks: int, preemptions: int) -> Suspended | None:
        """Take the request out of the batch between two steps, with the KV of its blocks past `copied_blocks`;
        None if it has ended. MigrationAborted if it was preempted since the migration began."""

    async def resume(self, request_id: str) -> None: ...

    async def prefix_hashes(self, request_id: str, num_blocks: int) -> list[int]:
        """Prefix-cache hashes of the request's first computed full blocks, at most `num_blocks`; [] without a
        prefix cache."""

    async def release(self, request_id: str) -> bool:
        """The request lives elsewhere now: free its blocks. False if it was aborted meanwhile."""


class DestinationPeer(Protocol):
    """The destination half as the source sees it (calls on the destination instance, with deadlines). Every
    failure reaches the source as MigrationAborted."""

    instance_id: str

    async def attach_prefix(self, migration_id: str, request_id: str, src: str, hashes: list[int]) -> int:
        """Begin the migration with the leading blocks of `hashes` the destination caches; how many."""

    async def reserve(self, migration_id: str, request_id: str, src: str, n: int) -> int:
        """Reserve n more blocks; the index within the request of the first of them."""

    async def receive(self, migration_id: str, first: int, payload: Any) -> None:
        """Blocks first.. of the request, as the transport delivers them."""

    async def commit(self, migration_id: str, state: Any, sink: Any, next_seq: int) -> None: ...

    async def abort(self, migration_id: str) -> None: ...

    async def abort_request(self, request_id: str) -> None: ...
