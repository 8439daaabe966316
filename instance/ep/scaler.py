"""Changing an instance's EP size while it serves.

    PLAN      the pure planner (placement.py) over the leader, the workers kept and the ones taken
    TAKE      idle workers from the pool (or new ones)
    COPY      each moved expert goes owner to owner (leader -> worker from the leader's copy; worker ->
              worker through Ray's object store) while the old placement keeps serving; the receiver checks
              each checksum on arrival and the leader checks what it reports against its own copy
    SWITCH    the dispatcher takes the new placement between two engine steps (refused if a worker was lost
              meanwhile)
    CLEANUP   old owners drop what moved away; workers left with nothing go back to the pool

Anything that fails before SWITCH rolls back: receivers drop what they took, taken workers go back (or are
stopped if they failed), the placement is unchanged and serving goes on. Asking for the EP size the
instance is at is a no-op. A worker lost while serving is repaired to the EP size asked for (never taken
as a scale-down): its experts are served by the leader at once (dispatch.py), then spread again over a
replacement worker by the same path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from instance.config import ExpertParallelConfig
from instance.ep.dispatch import ExpertDispatcher
from instance.ep.placement import LEADER, Key, Move, plan
from instance.ep.pool import WorkerPool
from instance.ep.worker import ExpertWeights

log = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 64 << 20     # experts go to a worker in calls of at most this much (pipelined, bounded memory)


class ExpertScaleError(Exception):
    """A scale request the instance refuses: `code` is a gRPC status name."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message

    def __reduce__(self):
        return ExpertScaleError, (self.code, self.message)


@dataclass(frozen=True)
class ScaleReport:
    instance_id: str
    previous: int
    ep_size: int                  # the size the instance is at after the command
    result: str                   # "scaled", "no-op", "dry run", "repaired", "rolled back: why"
    moves: tuple[Move, ...] = ()
    bytes_moved: int = 0
    prepare_ms: float = 0.0       # plan + take workers
    transfer_ms: float = 0.0      # copies, while the old placement serves
    switch_ms: float = 0.0        # the wait for a step boundary and the switch itself
    total_ms: float = 0.0
    ok: bool = True
    ranks: tuple[str, ...] = field(default=())


class ExpertScaler:
    def __init__(self, instance_id: str, dispatcher: ExpertDispatcher, pool: WorkerPool,
                 between_steps: Callable[[Callable[[], Any]], Awaitable[Any]], config: ExpertParallelConfig):
        self.instance_id = instance_id
        self.dispatcher, self.pool, self.between_steps, self.config = dispatcher, pool, between_steps, config
        self.target = dispatcher.ep_size
        self.in_flight = ""
        self.last: ScaleReport | None = None
        self._lock = asyncio.Lock()
        self._sums: dict[Key, str] | None = None

    def reference_sums(self) -> dict[Key, str]:
        """Checksums of every expert as the leader holds it (computed once)."""
        if self._sums is None:
            d = self.dispatcher
            self._sums = {(l, e): ExpertWeights.of(d.banks[l].expert(e)).checksum
                          for l in d.layers for e in range(d.num_experts)}
        return self._sums

    def check(self, ep_size: int) -> None:
        if not 1 <= ep_size <= self.config.max_size:
            raise ExpertScaleError("INVALID_ARGUMENT", f"ep: the EP size must be between 1 and ep.max_size "
                                   f"({self.config.max_size}) for {self.instance_id}, not {ep_size}")

    async def scale_to(self, ep_size: int, dry_run: bool = False, repair: bool = False) -> ScaleReport:
        self.check(ep_size)
        async with self._lock:
            d = self.dispatcher
            previous = d.ep_size
            if ep_size == previous:
                if not repair:
                    self.target = ep_size
                return ScaleReport(self.instance_id, previous, previous, "no-op", ranks=tuple(d.placement.ranks()))
            if dry_run:
                keep = list(d.workers)[:ep_size - 1]
                ranks = [LEADER] + keep + [f"(new {i + 1})" for i in range(ep_size - 1 - len(keep))]
                _, moves = plan(d.placement, ranks, d.observed_load())
                return ScaleReport(self.instance_id, previous, previous, "dry run", tuple(moves),
                                   self._bytes(moves), ranks=tuple(ranks))
            if not repair:
                self.target = ep_size
            self.in_flight = f"EP {previous} -> {ep_size}"
            try:
                report = await self._scale(previous, ep_size, "repaired" if repair else "scaled")
            finally:
                self.in_flight = ""
            if not report.ok and not repair:
                self.target = previous          # rolled back: the size asked for is the one it kept
            self.last = report
            asyncio.ensure_future(self._refill())
            return report

    async def repair(self) -> ScaleReport | None:
        """Bring the EP size back to the target after a worker was lost (retried while it fails)."""
        for attempt in range(3):
            if self.dispatcher.ep_size >= self.target:
                return None
            report = await self.scale_to(self.target, repair=True)
            if report.ok:
                log.info("instance %s: EP size repaired to %d after a lost worker", self.instance_id,
                         report.ep_size)
                return report
            await asyncio.sleep(0.5 * (attempt + 1))
        log.error("instance %s: could not repair the EP size to %d; the leader serves the lost experts",
                  self.instance_id, self.target)
        return None

    async def _refill(self) -> None:
        try:
            await self.pool.fill()
        except Exception as e:  # noqa: BLE001 - the next scale starts a worker itself
            log.warning("instance %s: refilling the expert worker pool failed: %r", self.instance_id, e)

    def _bytes(self, moves: list[Move]) -> int:
        d = self.dispatcher
        per = {l: sum(p.numel() * p.element_size() for p in d.banks[l].expert(0).parameters()) for l in d.layers}
        return sum(per[m.layer] for m in moves if m.dst != LEADER)

    async def _scale(self, previous: int, ep_size: int, verb: str) -> ScaleReport:
        d = self.dispatcher
        started = time.perf_counter()
        generation, current, workers = d.generation, d.placement, dict(d.workers)
        keep = list(workers)[:ep_size - 1]
        taken: list[Any] = []
        accepted: dict[str, list[Key]] = {}
        moves: list[Move] = []
        t_prep = t_copy = started
        try:
            for _ in range(ep_size - 1 - len(keep)):
                taken.append(await self.pool.take())
            every = {**workers, **{w.name: w for w in taken}}
            ranks = [LEADER] + keep + [w.name for w in taken]
            new, moves = plan(current, ranks, d.observed_load())
            t_prep = time.perf_counter()
            await self._copy(moves, every, accepted)
            t_copy = time.perf_counter()
            await self.between_steps(lambda: d.switch(new, {r: every[r] for r in ranks[1:]}, generation))
        except Exception as e:  # noqa: BLE001 - every failure before the switch rolls back
            why = str(e) or type(e).__name__
            await self._roll_back(accepted, workers, taken)
            total = 1000 * (time.perf_counter() - started)
            log.warning("instance %s: EP %d -> %d rolled back after %.0f ms (%s); serving goes on at EP %d",
                        self.instance_id, previous, ep_size, total, why, d.ep_size)
            return ScaleReport(self.instance_id, previous, d.ep_size, f"rolled back: {why}", tuple(moves),
                               total_ms=total, ok=False, ranks=tuple(d.placement.ranks()))
        t_switch = time.perf_counter()
        await self._clean_up(moves, workers, set(ranks))
        report = ScaleReport(self.instance_id, previous, d.ep_size, verb, tuple(moves), self._bytes(moves),
                             1000 * (t_prep - started), 1000 * (t_copy - t_prep), 1000 * (t_switch - t_copy),
                             1000 * (time.perf_counter() - started), ranks=tuple(ranks))
        log.info("instance %s: EP %d -> %d %s: %d experts moved (%.1f MB), prepare %.0f ms, copy %.0f ms, "
                 "switch %.1f ms", self.instance_id, previous, d.ep_size, verb, len(moves),
                 report.bytes_moved / 1e6, report.prepare_ms, report.transfer_ms, report.switch_ms)
        return report

    async def _copy(self, moves: list[Move], workers: dict[str, Any], accepted: dict[str, list[Key]]) -> None:
        """Every moved expert into its new owner, checked against the leader's checksums."""
        d = self.dispatcher
        sums = await asyncio.to_thread(self.reference_sums)     # hashing off the event loop: steps go on
        per_expert = max(1, self._bytes([Move(d.layers[0], 0, LEADER, "x")]))
        chunk = max(1, COPY_CHUNK_BYTES // per_expert)
        pairs: dict[tuple[str, str], list[Key]] = {}
        for m in moves:
            if m.dst != LEADER:                 # the leader holds every expert already
                pairs.setdefault((m.src, m.dst), []).append((m.layer, m.expert))
        chunks = {(s, t, i): keys[i:i + chunk] for (s, t), keys in pairs.items() for i in range(0, len(keys), chunk)}

        slots = asyncio.Semaphore(2)             # chunks in flight: bounds the copies' memory

        async def one(src: str, dst: str, keys: list[Key]) -> None:
            async with slots:
                await copy(src, dst, keys)

        async def copy(src: str, dst: str, keys: list[Key]) -> None:
            accepted.setdefault(dst, []).extend(keys)       # before the call: a rollback drops what may have landed
            if src == LEADER:
                bundle = await asyncio.to_thread(
                    lambda: {k: ExpertWeights.of(d.banks[k[0]].expert(k[1]), sums[k]) for k in keys})
                got = await workers[dst].accept(bundle)
            else:
                got = await workers[dst].accept_from(workers[src], keys)
            bad = [k for k in keys if got.get(k) != sums[k]]
            if bad:
                raise ValueError(f"expert worker {dst} holds experts {bad[:4]} whose checksums differ from the "
                                 f"leader's")

        results = await asyncio.gather(*(one(s, t, k) for (s, t, _), k in chunks.items()), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]

    async def _roll_back(self, accepted: dict[str, list[Key]], workers: dict[str, Any], taken: list[Any]) -> None:
        for name, keys in accepted.items():
            if name in workers and name in self.dispatcher.workers:       # still serving: drop only the copies
                try:
                    await workers[name].drop(keys)
                except Exception as e:  # noqa: BLE001
                    log.warning("rollback: %s did not drop %d copies: %r", name, len(keys), e)
        for w in taken:                 # a taken worker may be broken: stop it; the pool starts a fresh one
            self.pool.retire(w)
        try:                            # and the idle ones may have died the same way
            await self.pool.check()
        except Exception as e:  # noqa: BLE001
            log.warning("rollback: checking the idle expert workers failed: %r", e)

    async def _clean_up(self, moves: list[Move], old_workers: dict[str, Any], ranks: set[str]) -> None:
        by_src: dict[str, list[Key]] = {}
        for m in moves:
            if m.src != LEADER:
                by_src.setdefault(m.src, []).append((m.layer, m.expert))
        for name, keys in by_src.items():
            try:
                left = await old_workers[name].drop(keys)
            except Exception as e:  # noqa: BLE001 - a retired worker is stopped anyway
                log.warning("cleanup: %s did not drop %d moved experts: %r", name, len(keys), e)
                left = -1
            if name not in ranks:
                if left == 0:
                    self.pool.give_back(old_workers[name])
                else:
                    self.pool.retire(old_workers[name])
        for name, w in old_workers.items():
            if name not in ranks and name not in by_src:
                self.pool.give_back(w)


def placement_lines(dispatcher: ExpertDispatcher) -> dict[str, tuple[str, ...]]:
    """rank -> 'layer:experts' strings, for status."""
    p = dispatcher.placement
    return {r: tuple(f"{l}:{','.join(str(e) for _, e in p.experts_of(r, l))}" for l in p.layers
                     if p.experts_of(r, l)) for r in p.ranks()}

