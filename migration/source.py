"""The source half of a live migration: pre-copy stages, then the last stage and the hand-over."""

from __future__ import annotations

import asyncio
import logging
import time

from migration.protocol import (DestinationPeer, MigrationAborted, MigrationConfig, MigrationRecord,
                                MigrationState, RequestSnapshot, SourcePort)
from migration.transport import KVTransport

log = logging.getLogger(__name__)


def _check(snap: RequestSnapshot | None, preemptions: int) -> RequestSnapshot:
    if snap is None:
        raise MigrationAborted(MigrationState.ENDED, "the request finished or was aborted")
    if snap.suspended:
        raise MigrationAborted(MigrationState.ABORTED_SRC, "the request is already being migrated")
    if snap.num_preemptions != preemptions:
        raise MigrationAborted(MigrationState.ABORTED_SRC, "the request was preempted on the source")
    return snap


async def migrate_out(port: SourcePort, peer: DestinationPeer, transport: KVTransport, record: MigrationRecord,
                      config: MigrationConfig, handoff: bool = False) -> MigrationRecord:
    """Move record.request_id to `peer`. Returns the record in a final state; never raises for a failed
    migration (the request then keeps running on the source, or has ended).

    `handoff`: a prefill-to-decode hand-over. Pre-copy runs while the request is prefilled, and the last
    stage comes as soon as it has its first token (see the module docstring of migration.protocol)."""
    rid, mid, bs = record.request_id, record.migration_id, port.block_size
    record.started_at = time.time()
    prefill_deadline = time.monotonic() + config.handoff_prefill_timeout_s
    suspended = False
    try:
        snap = await port.snapshot(rid)
        if snap is None:
            raise MigrationAborted(MigrationState.ENDED, "no such request on the source")
        snap = _check(snap, snap.num_preemptions)
        preemptions = snap.num_preemptions
        record.tokens_at_start = snap.num_computed_tokens
        copied = 0
        reservation = _Reservation(peer, mid, rid, record.src)
        hashes = await port.prefix_hashes(rid, snap.num_computed_tokens // bs)
        if hashes and hasattr(peer, "attach_prefix"):   # blocks the destination caches already are not copied
            copied = reservation.blocks = record.blocks_found = await peer.attach_prefix(mid, rid, record.src,
                                                                                        hashes)
        if config.reserve_upfront:       # all it will need, before any copy: fail now rather than after seconds
            await reservation.cover(-(-snap.num_tokens // bs) + config.last_stage_max_blocks
                                    + config.reserve_growth_blocks)
        record.state = MigrationState.COPYING
        while True:
            full = snap.num_computed_tokens // bs          # full blocks no longer change
            delta = full - copied
            if handoff and snap.num_output_tokens == 0:    # still in its prefill: copy what is done, or wait
                if time.monotonic() > prefill_deadline:
                    raise MigrationAborted(MigrationState.ABORTED_SRC, "the request's prefill did not finish "
                                           f"within {config.handoff_prefill_timeout_s:g} s")
                if delta == 0:
                    snap = _check(await port.snapshot(rid), preemptions)   # returns after the next step
                    continue
            elif handoff or delta <= config.last_stage_max_blocks or record.stage >= config.max_stages:
                break
            await reservation.cover(full)
            blocks = await port.export(rid, copied, full)
            await transport.send(peer, mid, copied, blocks)
            snap = _check(await port.snapshot(rid), preemptions)   # still here, and those blocks still its own
            copied = full
            record.stage += 1
            record.blocks_copied = copied
            record.stage_blocks.append(delta)
            if config.stage_pause_s:
                await asyncio.sleep(config.stage_pause_s)
                snap = _check(await port.snapshot(rid), preemptions)

        record.state = MigrationState.LAST_STAGE
        taken = await port.suspend(rid, copied, preemptions)
        if taken is None:
            raise MigrationAborted(MigrationState.ENDED, "the request finished or was aborted")
        suspended = True
        out_at = time.perf_counter()
        if taken.num_rest_blocks:
            await reservation.cover(copied + taken.num_rest_blocks)
            await transport.send(peer, mid, copied, taken.rest)
            record.blocks_copied = copied + taken.num_rest_blocks
        record.stage_blocks.append(taken.num_rest_blocks)
        try:
            await peer.commit(mid, taken.state, taken.sink, taken.next_seq)
        except Exception:
            # the commit may have landed even though we saw an error: make sure only one copy runs
            await _quietly(peer.abort(mid))
            raise
        record.downtime_ms = 1000 * (time.perf_counter() - out_at)
        suspended = False
        record.state = MigrationState.COMMITTED
        if not await port.release(rid):
            # the client aborted while the request was in flight: the abort follows it to the destination
            await _quietly(peer.abort_request(rid))
            record.reason = "aborted by the client during the hand-over"
    except MigrationAborted as e:
        record.state, record.reason = e.state, e.reason
    except Exception as e:  # noqa: BLE001 - whatever broke, the request must go back to running
        log.exception("migration %s of %s failed", mid, rid)
        record.state, record.reason = MigrationState.ABORTED_SRC, f"{type(e).__name__}: {e}"
    finally:
        if record.state is not MigrationState.COMMITTED:
            if suspended:
                await port.resume(rid)
            await _quietly(peer.abort(mid))
        record.ended_at = time.time()
    log.info("migration %s: %s %s -> %s %s after %d stages, %d blocks (%d of them found cached there), downtime "
             "%.1f ms%s", mid, rid, record.src, record.dst, record.state.value, record.stage, record.blocks_copied,
             record.blocks_found, record.downtime_ms, f" ({record.reason})" if record.reason else "")
    return record


class _Reservation:
    """The blocks reserved for one migration on its destination; `cover(n)` reserves what is missing of the
    first n (the destination hands out block indices in order, so block i of the request lands at index i)."""

    def __init__(self, peer: DestinationPeer, migration_id: str, request_id: str, src: str):
        self.peer, self.migration_id, self.request_id, self.src = peer, migration_id, request_id, src
        self.blocks = 0

    async def cover(self, n: int) -> None:
        if n > self.blocks:
            first = await self.peer.reserve(self.migration_id, self.request_id, self.src, n - self.blocks)
            if first != self.blocks:
                raise MigrationAborted(MigrationState.ABORTED_DST, f"the destination reserved from block {first}, "
                                       f"expected {self.blocks}")
            self.blocks = n


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception as e:  # noqa: BLE001 - best effort clean-up on a peer that may be gone
        log.debug("best-effort migration clean-up failed: %r", e)
