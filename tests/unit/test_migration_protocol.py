"""The migration protocol's two halves over two real engines in one process, with faults injected at exact
points: an abort in each state, a failing destination, a preempted source. The ports are the instance's own
(`instance.migration_ports`), run inline instead of through a step loop; tests/integration covers the same
protocol between real Ray actors."""

import asyncio
import random

import pytest

from instance.engine import Engine
from instance.migration_ports import EngineDestinationPort, EngineSourcePort
from instance.sampling import SamplingParams
from instance.streams import StreamRegistry
from migration.destination import MigrationDestination
from migration.protocol import MigrationAborted, MigrationConfig, MigrationRecord, MigrationState
from migration.source import migrate_out
from migration.transport import RayObjectStoreTransport

ENGINE = dict(model="tiny-llama", num_blocks=200, block_size=4, max_model_len=512, max_num_batched_tokens=64)
PARAMS = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
CONFIG = MigrationConfig(last_stage_max_blocks=2)


class InlineSteps:
    """The step loop of an engine that nobody steps in the background: calls run at once."""

    async def between_steps(self, fn):
        return fn()

    async def beside_step(self, fn, *args):
        return fn(*args)


class Hooks:
    """`hooks[name]()` runs before the port call `name`."""

    def __init__(self):
        self.hooks = {}

    def _hook(self, name):
        if name in self.hooks:
            self.hooks.pop(name)()


class Source(EngineSourcePort, Hooks):
    def __init__(self, engine: Engine):
        EngineSourcePort.__init__(self, engine, InlineSteps(), StreamRegistry("src"))
        Hooks.__init__(self)

    async def snapshot(self, rid):
        self._hook("snapshot")
        return await super().snapshot(rid)

    async def export(self, rid, start, end):
        self._hook("export")
        return await super().export(rid, start, end)

    async def suspend(self, rid, copied, preemptions):
        self._hook("suspend")
        return await super().suspend(rid, copied, preemptions)


class Destination(Hooks):
    """The destination instance: its port and half, and the DestinationPeer the source calls (with hooks)."""

    instance_id = "dst"

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self.port = EngineDestinationPort(engine, InlineSteps(), StreamRegistry("dst"))
        self.half = MigrationDestination(self.port, CONFIG, RayObjectStoreTransport().receive)

    async def reserve(self, mid, rid, src, n):
        self._hook("reserve")
        return await self.half.reserve(mid, rid, src, n)

    async def receive(self, mid, first, payload):
        await self.half.receive(mid, first, payload)

    async def commit(self, mid, state, sink, seq):
        self._hook("commit")
        await self.half.commit(mid, state, sink, seq)

    async def abort(self, mid):
        await self.half.abort(mid)

    async def abort_request(self, rid):
        return await self.port.abort_request(rid)


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
        load = e.load()
        assert load.free_blocks == load.total_blocks and not e.list_requests()


def test_committed_migration_continues_with_the_same_tokens(reference):
    src, dst, p, before = start()
    record = migrate(src, dst)
    assert record.state is MigrationState.COMMITTED and record.stage >= 1
    assert record.stage_blocks[-1] <= CONFIG.last_stage_max_blocks + 1
    assert src.engine.request_info("r") is None
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
    assert dst.engine.load().free_blocks == dst.engine.load().total_blocks      # reservation released
    assert before + finish(src.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    assert_clean(src.engine, dst.engine)


def test_a_destination_out_of_blocks_aborts_cleanly(reference):
    src = Source(Engine(**ENGINE))
    dst = Destination(Engine(**{**ENGINE, "num_blocks": 130}))
    src.engine.add_request("r", prompt_token_ids=[7] * 500, params=SamplingParams(max_tokens=8, temperature=0))
    for _ in range(9):                                                # prefill 500 tokens, 64 a step
        src.engine.step()
    dst.engine.reserve_import("another", 100)                        # most of it is taken
    record = migrate(src, dst)
    assert record.state is MigrationState.ABORTED_DST and "blocks" in record.reason
    assert dst.engine.load().reserved_blocks == 100                   # only ours remain
    finish(src.engine)
    src.engine.check_integrity()


def test_preemption_on_the_source_during_copying_aborts_and_the_request_goes_on(reference):
    src, dst, p, before = start()

    def preempt():
        core = src.engine.core
        core.scheduler.preempt(core.get("r"))

    src.hooks["export"] = preempt
    record = migrate(src, dst)
    assert record.state is MigrationState.ABORTED_SRC and "preempted" in record.reason
    assert before + finish(src.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    assert_clean(src.engine, dst.engine)


def test_a_silent_source_leaves_a_reservation_that_the_watchdog_frees():
    clock = [0.0]
    dst = Destination(Engine(**ENGINE))
    dst.half = MigrationDestination(dst.port, CONFIG.model_copy(update={"dst_idle_timeout_s": 5.0}),
                                    RayObjectStoreTransport().receive, clock=lambda: clock[0])
    asyncio.run(dst.reserve("m9", "r", "src", 10))
    assert dst.engine.load().reserved_blocks == 10
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
    dst.half = MigrationDestination(dst.port, CONFIG.model_copy(update={"dst_idle_timeout_s": 5.0}),
                                    RayObjectStoreTransport().receive, clock=lambda: clock[0])
    gate = asyncio.Event()
    inner = dst.port.reserve

    async def slow_reserve(import_id, n):
        await gate.wait()                      # the destination is busy with a step
        return await inner(import_id, n)

    dst.port.reserve = slow_reserve

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


def fill(engine: Engine) -> list[str]:
    """Dispatch prompts onto `engine` until none of its blocks is free, as a burst of arrivals would."""
    fillers = []
    while (free := engine.load().free_blocks) > 0:
        rid = f"filler-{len(fillers)}"
        blocks = min(free - engine.load().num_running, 128)
        engine.add_request(rid, prompt_token_ids=[9] * (4 * blocks), params=SamplingParams(max_tokens=4))
        engine.step()
        fillers.append(rid)
        if engine.load().num_waiting:
            break
    return fillers


@pytest.mark.parametrize("upfront", [True, False])
def test_a_destination_filled_after_the_migration_starts(reference, upfront):
    """With reserve_upfront the blocks the whole request needs are set aside before the first copy, so
    dispatches that fill the destination during the pre-copy cannot make it abort; without, they do."""
    src, dst = SteppingSource(Engine(**ENGINE)), Destination(Engine(**{**ENGINE, "num_blocks": 128}))
    p = [random.Random(4).randrange(256) for _ in range(120)]
    src.engine.add_request("r", prompt_token_ids=p, params=PARAMS)
    for _ in range(3):
        src.streamed += [t for o in src.engine.step() for t in o.new_token_ids]
    fillers, free_after = [], []

    def burst():                                                       # a burst lands during stage 1
        fillers.extend(fill(dst.engine))
        free_after.append(dst.engine.load().free_blocks)

    src.hooks["export"] = burst
    config = CONFIG.model_copy(update={"reserve_upfront": upfront})
    record = MigrationRecord("m1", "r", "src", "dst")
    asyncio.run(migrate_out(src, dst, RayObjectStoreTransport(), record, config))
    assert fillers and free_after == [0]
    for rid in fillers:
        dst.engine.abort(rid)
    if upfront:
        assert record.state is MigrationState.COMMITTED, record.reason
        assert src.streamed + finish(dst.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    else:
        assert record.state is MigrationState.ABORTED_DST and "cannot reserve" in record.reason
        assert src.streamed + finish(src.engine) == reference.generate([p], PARAMS)[0].new_token_ids
    assert_clean(src.engine, dst.engine)


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
    assert src.engine.request_info("r") is not None
    assert dst.engine.load().free_blocks == dst.engine.load().total_blocks
    src.engine.abort("r")
    assert_clean(src.engine, dst.engine)
