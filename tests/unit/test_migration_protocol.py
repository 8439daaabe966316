"""The migration protocol's two halves over two real engines in one process, with faults injected at exact
points: an abort in each state, a failing destination, a preempted source. (tests/integration covers the same
protocol between real Ray actors.)"""

import asyncio
import random

import pytest

from instance.engine import Engine
from instance.sampling import SamplingParams
from migration.destination import MigrationDestination
from migration.protocol import (MigrationAborted, MigrationConfig, MigrationRecord, MigrationState,
                                RequestSnapshot)
from migration.source import migrate_out
from migration.transport import RayObjectStoreTransport

ENGINE = dict(model="tiny-llama", num_blocks=200, block_size=4, max_model_len=512, max_num_batched_tokens=64)
PARAMS = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
CONFIG = MigrationConfig(last_stage_max_blocks=2)


class Source:
    """SourcePort over an Engine; `hooks[name]()` runs before the port call `name`."""

    def __init__(self, engine: Engine):
        self.engine, self.block_size, self.hooks = engine, engine.config.block_size, {}

    def _hook(self, name):
        if name in self.hooks:
            self.hooks.pop(name)()

    async def snapshot(self, rid):
        self._hook("snapshot")
        info = self.engine.request_info(rid, with_blocks=True)
        return info and RequestSnapshot(info.num_computed_tokens, info.block_ids, info.num_preemptions,
                                        info.status == "suspended", info.num_output_tokens)

    async def export(self, ids):
        self._hook("export")
        return self.engine.export_blocks(ids)

    async def suspend(self, rid, copied, preemptions):
        self._hook("suspend")
        info = self.engine.request_info(rid, with_blocks=True)
        if info is None:
            return None
        if info.num_preemptions != preemptions:
            raise MigrationAborted(MigrationState.ABORTED_SRC, "preempted")
        state = self.engine.suspend(rid)
        needed = -(-state.num_computed_tokens // self.block_size)
        rest = self.engine.export_blocks(list(info.block_ids[copied:needed])) if needed > copied else None
        return state, None, 0, rest

    async def resume(self, rid):
        if self.engine.request_info(rid):
            self.engine.resume(rid)

    async def release(self, rid):
        if self.engine.request_info(rid) is None:
            return False
        self.engine.free_suspended(rid)
        return True


class Destination:
    """DestinationPort over an Engine, and the DestinationPeer the source calls (with hooks)."""

    instance_id = "dst"

    def __init__(self, engine: Engine):
        self.engine, self.hooks = engine, {}
        self.half = MigrationDestination(self, CONFIG, RayObjectStoreTransport().receive)

    def _hook(self, name):
        if name in self.hooks:
            self.hooks.pop(name)()

    # port (the destination half calls these)
    async def reserve_blocks(self, n):
        return self.engine.reserve_blocks(n)

    async def import_blocks(self, ids, blocks):
        self.engine.import_blocks(ids, blocks)

    async def release_blocks(self, ids):
        self.engine.release_reserved(ids)

    async def admit(self, state, ids, sink, seq):
        self.engine.admit_migrated(state, ids)

    async def abort_request(self, rid):
        return self.engine.abort(rid)

    # peer (the source calls these)
    async def reserve(self, mid, rid, src, n):
        self._hook("reserve")
        return await self.half.reserve(mid, rid, src, n)

    async def receive(self, mid, ids, payload):
        await self.half.receive(mid, ids, payload)

    async def commit(self, mid, state, sink, seq):
        self._hook("commit")
        await self.half.commit(mid, state, sink, seq)

    async def abort(self, mid):
        await self.half.abort(mid)


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**ENGINE)


def start(prompt_len=120, steps=8, seed=0):
    src, dst = Source(Engine(**ENGINE)), Destination(Engine(**ENGINE))
    rng = random.Random(seed)
    p = [rng.randrange(256) for _ in range(prompt_len)]
    src.engine.add_request("r", prompt_token_ids=p, params=PARAMS)
    tokens = []
    for _ in range(steps):
        tokens += [t for o in src.engine.step() for t in o.new_token_ids]
    return src, dst, p, tokens


def migrate(src, dst) -> MigrationRecord:
    record = MigrationRecord("m1", "r", "src", "dst")
    return asyncio.run(migrate_out(src, dst, RayObjectStoreTransport(), record, CONFIG))


def finish(engine: Engine) -> list[int]:
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.new_token_ids]
    return out


def assert_clean(*engines):
    for e in engines:
        e.check_integrity()
        assert e.pool.num_free == e.pool.num_blocks and not e.requests


def test_committed_migration_continues_with_the_same_tokens(reference):
    src, dst, p, before = start()
    record = migrate(src, dst)
    assert record.state is MigrationState.COMMITTED and record.stage >= 1
    assert record.stage_blocks[-1] <= CONFIG.last_stage_max_blocks + 1
    assert "r" not in src.engine.requests
    assert before + finish(dst.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    assert_clean(src.engine, dst.engine)


def test_abort_before_it_starts_ends_the_migration():
    src, dst, _, _ = start()
    src.engine.abort("r")
    record = migrate(src, dst)
    assert record.state is MigrationState.ENDED
    assert_clean(src.engine, dst.engine)


def test_abort_while_copying_releases_the_destinations_reservation():
    src, dst, _, _ = start()
    dst.hooks["commit"] = lambda: pytest.fail("must not commit")
    src.hooks["export"] = lambda: src.engine.abort("r")       # the client aborts during stage 1
    record = migrate(src, dst)
    assert record.state is MigrationState.ENDED and record.stage == 0
    assert_clean(src.engine, dst.engine)


def test_abort_in_the_last_stage_follows_the_request_to_the_destination():
    src, dst, _, _ = start()
    dst.hooks["commit"] = lambda: src.engine.abort("r")       # lands after suspend, before the commit
    record = migrate(src, dst)
    assert record.state is MigrationState.COMMITTED and "aborted by the client" in record.reason
    assert_clean(src.engine, dst.engine)


def test_a_failing_commit_puts_the_request_back_on_the_source(reference):
    src, dst, p, before = start()

    def fail():
        raise MigrationAborted(MigrationState.ABORTED_DST, "destination crashed")

    dst.hooks["commit"] = fail
    record = migrate(src, dst)
    assert record.state is MigrationState.ABORTED_DST
    assert dst.engine.pool.num_free == dst.engine.pool.num_blocks       # reservation released
    assert before + finish(src.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    assert_clean(src.engine, dst.engine)


def test_a_destination_out_of_blocks_aborts_cleanly(reference):
    src = Source(Engine(**ENGINE))
    dst = Destination(Engine(**{**ENGINE, "num_blocks": 130}))
    src.engine.add_request("r", prompt_token_ids=[7] * 500, params=SamplingParams(max_tokens=8, temperature=0))
    for _ in range(9):                                                # prefill 500 tokens, 64 a step
        src.engine.step()
    dst.engine.reserve_blocks(100)                                    # most of it is taken
    record = migrate(src, dst)
    assert record.state is MigrationState.ABORTED_DST and "blocks" in record.reason
    assert dst.engine.pool.num_reserved == 100                        # only ours remain
    finish(src.engine)
    src.engine.check_integrity()


def test_preemption_on_the_source_during_copying_aborts_and_the_request_goes_on(reference):
    src, dst, p, before = start()

    def preempt():
        req = src.engine.requests["r"]
        src.engine.scheduler.running.remove(req)
        src.engine.scheduler.free_blocks(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        src.engine.scheduler.add(req)

    src.hooks["export"] = preempt
    record = migrate(src, dst)
    assert record.state is MigrationState.ABORTED_SRC and "preempted" in record.reason
    assert before + finish(src.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    assert_clean(src.engine, dst.engine)


def test_a_silent_source_leaves_a_reservation_that_the_watchdog_frees():
    clock = [0.0]
    dst = Destination(Engine(**ENGINE))
    dst.half = MigrationDestination(dst, CONFIG.model_copy(update={"dst_idle_timeout_s": 5.0}),
                                    RayObjectStoreTransport().receive, clock=lambda: clock[0])
    asyncio.run(dst.reserve("m9", "r", "src", 10))
    assert dst.engine.pool.num_reserved == 10
    clock[0] = 4.0
    assert asyncio.run(dst.half.reap()) == []
    clock[0] = 6.0
    assert asyncio.run(dst.half.reap()) == ["m9"]
    assert_clean(dst.engine)


def test_a_reservation_reaped_while_it_waits_for_blocks_is_released_not_leaked():
    """The reaper runs while reserve() waits for the destination's step to end (found by the downtime benchmark:
    a new reservation looked silent since time 0 and its blocks leaked)."""
    clock = [100.0]
    dst = Destination(Engine(**ENGINE))
    dst.half = MigrationDestination(dst, CONFIG.model_copy(update={"dst_idle_timeout_s": 5.0}),
                                    RayObjectStoreTransport().receive, clock=lambda: clock[0])
    gate = asyncio.Event()
    inner = dst.reserve_blocks

    async def slow_reserve(n):
        await gate.wait()                      # the destination is busy with a step
        return await inner(n)

    dst.reserve_blocks = slow_reserve

    async def scenario():
        reserving = asyncio.ensure_future(dst.half.reserve("m1", "r", "src", 8))
        await asyncio.sleep(0)
        assert await dst.half.reap() == []     # a reservation in progress is not silent
        clock[0] += 10                          # ... but one that waits past the idle timeout is
        assert await dst.half.reap() == ["m1"]
        gate.set()
        with pytest.raises(MigrationAborted, match="expired"):
            await reserving

    asyncio.run(scenario())
    assert_clean(dst.engine)


class SteppingSource(Source):
    """A source whose engine runs one step before each snapshot, as the actor answers between steps."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self.streamed: list[int] = []

    async def snapshot(self, rid):
        self.streamed += [t for o in self.engine.step() for t in o.new_token_ids]
        return await super().snapshot(rid)


def test_a_hand_over_copies_the_prompt_during_its_prefill_and_leaves_after_the_first_token(reference):
    src, dst = SteppingSource(Engine(**ENGINE)), Destination(Engine(**ENGINE))
    p = [random.Random(3).randrange(256) for _ in range(300)]        # 5 prefill steps of 64 tokens
    src.engine.add_request("r", prompt_token_ids=p, params=PARAMS)
    src.engine.step()                                                 # admitted, 64 tokens computed
    record = MigrationRecord("h1", "r", "src", "dst")
    asyncio.run(migrate_out(src, dst, RayObjectStoreTransport(), record, CONFIG, handoff=True))
    assert record.state is MigrationState.COMMITTED
    assert record.stage >= 3                                  # stages ran while the prefill went on
    assert sum(record.stage_blocks[:-1]) >= 300 // 4 - 16     # most of the prompt was copied before it left
    assert len(src.streamed) == 1                             # it left right after its first token
    assert src.streamed + finish(dst.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    assert_clean(src.engine, dst.engine)


def test_a_hand_over_whose_prefill_never_finishes_gives_up_cleanly():
    src, dst = Source(Engine(**ENGINE)), Destination(Engine(**ENGINE))   # never steps: the prefill stalls
    src.engine.add_request("r", prompt_token_ids=[5] * 100, params=PARAMS)
    record = MigrationRecord("h2", "r", "src", "dst")
    config = CONFIG.model_copy(update={"handoff_prefill_timeout_s": 0.05})
    asyncio.run(migrate_out(src, dst, RayObjectStoreTransport(), record, config, handoff=True))
    assert record.state is MigrationState.ABORTED_SRC and "prefill did not finish" in record.reason
    assert "r" in src.engine.requests and dst.engine.pool.num_free == dst.engine.pool.num_blocks
    src.engine.abort("r")
    assert_clean(src.engine, dst.engine)
