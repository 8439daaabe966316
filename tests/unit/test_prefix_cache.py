"""Prefix caching in the native engine (tiny-llama): shared prefixes are computed once, outputs do not change,
cached blocks are evicted least-recently-used only under pressure, integrity holds through aborts and
preemptions, and a migration copies only the blocks its destination lacks."""

import asyncio
import random

import pytest

from instance.engine import Engine
from instance.kv_cache import BlockPool, block_hashes, blocks_for
from instance.migration_ports import EngineDestinationPort, EngineSourcePort
from instance.sampling import SamplingParams
from instance.streams import StreamRegistry
from migration.destination import MigrationDestination
from migration.protocol import MigrationConfig, MigrationRecord, MigrationState
from migration.source import migrate_out
from migration.transport import RayObjectStoreTransport

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=77, ignore_eos=True)
BS = 4


def tiny(caching: bool = True, **kw) -> Engine:
    cfg = dict(model="tiny-llama", num_blocks=96, block_size=BS, max_model_len=256, max_num_batched_tokens=64,
               prefix_caching=caching)
    cfg.update(kw)
    return Engine(**cfg)


@pytest.fixture(scope="module")
def plain() -> Engine:
    """The reference: the same engine without prefix caching."""
    return tiny(caching=False)


def rand_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def run(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    return engine.generate([prompt], params)[0].new_token_ids


def assert_clean(*engines: Engine) -> None:
    for e in engines:
        e.check_integrity()
        load = e.load()
        assert load.free_blocks == load.total_blocks and not e.list_requests()


# ----- the pool on its own ----------------------------------------------------------------------------------
def test_pool_keeps_freed_cached_blocks_and_evicts_them_lru_only_when_the_rest_ran_out():
    pool = BlockPool(6, caching=True)
    old, new = pool.allocate(2), pool.allocate(2)
    for b, h in zip(old + new, (11, 12, 21, 22)):
        assert pool.cache(b, h)
    pool.free(old)
    pool.free(new)
    assert (pool.num_free, pool.num_cached, pool.num_used) == (6, 4, 0)
    pool.check_integrity()
    assert pool.cached_prefix([11, 12, 13]) == old                  # the longest cached run, in order
    pool.allocate(2)                                                # the two never-cached blocks first
    assert pool.num_evicted == 0 and pool.num_cached == 4
    pool.acquire(pool.cached_prefix([21]))                          # "new" used again: "old" is the LRU now
    pool.allocate(1)
    assert pool.num_evicted == 1 and pool.cached_prefix([11, 12]) == old[:1]   # the tail went first
    assert pool.cached_prefix([21, 22]) == new
    pool.check_integrity()


def test_block_hashes_chain_prefixes_and_separate_models():
    a = block_hashes(list(range(12)), 4, "m1")
    b = block_hashes(list(range(8)) + [99, 9, 10, 11], 4, "m1")
    assert a[:2] == b[:2] and a[2] != b[2]
    assert block_hashes(list(range(12)), 4, "m2")[0] != a[0]
    assert block_hashes(list(range(12)), 4, "m1", start=1, parent=a[0]) == a[1:]


# ----- the engine --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_second_request_with_a_shared_prefix_prefills_only_its_suffix(plain, params):
    prefix = rand_tokens(40, seed=1)                    # 10 full blocks
    first, second = prefix + rand_tokens(9, seed=2), prefix + rand_tokens(7, seed=3)
    e = tiny()
    assert run(e, first, params) == run(plain, first, params)
    computed, hits = e.core.num_computed_total, e.load().prefix_hit_tokens
    assert run(e, second, params) == run(plain, second, params)
    load = e.load()
    assert load.prefix_hit_tokens - hits == 40
    # the suffix, then one token fed per decode step (the last sampled token is never fed)
    assert e.core.num_computed_total - computed == len(second) - 40 + params.max_tokens - 1
    assert 0 < load.cached_blocks <= load.free_blocks and load.prefix_hit_rate > 0
    assert_clean(e)


def test_a_prompt_fully_cached_still_computes_its_last_token(plain):
    prompt = rand_tokens(32, seed=4)                    # exactly 8 blocks
    e = tiny()
    assert run(e, prompt, GREEDY) == run(plain, prompt, GREEDY)
    computed = e.core.num_computed_total
    assert run(e, prompt, GREEDY) == run(plain, prompt, GREEDY)
    assert e.core.num_computed_total - computed == BS + GREEDY.max_tokens - 1   # the last block is recomputed
    assert_clean(e)


def test_caching_off_computes_everything_and_caches_nothing(plain):
    prompt = rand_tokens(30, seed=5)
    before = plain.core.num_computed_total
    run(plain, prompt, GREEDY)
    run(plain, prompt, GREEDY)
    load = plain.load()
    assert plain.core.num_computed_total - before == 2 * (30 + GREEDY.max_tokens - 1)
    assert load.cached_blocks == 0 and load.prefix_query_tokens == 0 and load.cached_prefixes == ()


def test_eviction_under_memory_pressure_keeps_outputs_and_frees_everything(plain):
    e = tiny(num_blocks=40, max_model_len=160)
    hot = rand_tokens(48, seed=6)                       # 12 blocks, then 3 more for its output
    assert run(e, hot, GREEDY) == run(plain, hot, GREEDY)
    cached = e.load().cached_blocks
    assert cached >= 12
    small = rand_tokens(20, seed=7)                     # fits beside the cached prefix: nothing is evicted
    run(e, small, GREEDY)
    assert e.core.pool.num_evicted == 0
    hits = e.load().prefix_hit_tokens
    assert run(e, hot, GREEDY) == run(plain, hot, GREEDY)
    assert e.load().prefix_hit_tokens - hits == 44      # all of it but the last block
    big = [rand_tokens(140, seed=10 + i) for i in range(2)]
    outs = e.generate(big, GREEDY)                      # needs nearly every block: the cache gives way
    assert [o.new_token_ids for o in outs] == [run(plain, p, GREEDY) for p in big]
    assert e.core.pool.num_evicted > 0
    assert run(e, hot, GREEDY) == run(plain, hot, GREEDY)
    assert_clean(e)


def test_randomized_run_with_shared_prefixes_aborts_and_preemptions_keeps_integrity_every_step(plain):
    rng = random.Random(3)
    systems = [rand_tokens(rng.choice([8, 16, 23]), seed=100 + i) for i in range(3)]
    e = tiny(num_blocks=40, max_num_batched_tokens=32, max_num_seqs=12, max_model_len=128)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts, got, aborted = {}, {}, set()
    n = 0
    for step in range(2000):
        while n < 40 and rng.random() < 0.4:
            rid = f"r{n}"
            prompts[rid] = rng.choice(systems) + rand_tokens(rng.randint(1, 30), seed=1000 + n)
            e.add_request(rid, prompt_token_ids=prompts[rid], params=params)
            got[rid] = []
            n += 1
        if got and rng.random() < 0.05:
            victim = rng.choice(sorted(got))
            if e.abort(victim):
                aborted.add(victim)
        for o in e.step():
            got[o.request_id] += o.new_token_ids
        e.check_integrity()
        if n == 40 and not e.has_unfinished():
            break
    assert not e.has_unfinished()
    load = e.load()
    assert load.num_preemptions_total > 0, "the run should preempt (make the cache smaller)"
    assert load.prefix_hit_tokens > 0 and e.core.pool.num_evicted > 0
    finished = sorted(set(got) - aborted)
    assert len(finished) > 25
    assert [got[r] for r in finished] == [run(plain, prompts[r], params) for r in finished]
    assert_clean(e)


def test_failover_resume_from_tokens_reuses_the_cached_prompt(plain):
    prompt = rand_tokens(37, seed=8)
    reference = run(plain, prompt, GREEDY)
    e = tiny()
    run(e, prompt, GREEDY)                             # the prompt's blocks are cached here now
    hits = e.load().prefix_hit_tokens
    e.resume_from_tokens("f", prompt, reference[:5], GREEDY, seed=0, priority=0, text_emitted=0)
    rest = []
    while e.has_unfinished():
        rest += [t for o in e.step() for t in o.new_token_ids]
    assert reference[:5] + rest == reference
    assert e.load().prefix_hit_tokens - hits >= 36
    assert_clean(e)


# ----- migration ---------------------------------------------------------------------------------------------
class InlineSteps:
    async def between_steps(self, fn):
        return fn()

    async def beside_step(self, fn, *args):
        return fn(*args)


class Peer:
    """The destination half as the source calls it, over an in-process engine."""

    instance_id = "dst"

    def __init__(self, engine: Engine, config: MigrationConfig):
        self.port = EngineDestinationPort(engine, InlineSteps(), StreamRegistry("dst"))
        self.half = MigrationDestination(self.port, config, RayObjectStoreTransport().receive)

    def __getattr__(self, name):
        return getattr(self.half, name)

    async def abort_request(self, rid):
        return await self.port.abort_request(rid)


class CountingTransport(RayObjectStoreTransport):
    def __init__(self):
        self.blocks_sent = 0

    async def send(self, peer, migration_id, first, blocks):
        self.blocks_sent += blocks.shape[2]
        await super().send(peer, migration_id, first, blocks)


@pytest.mark.parametrize("cached_on_dst", [True, False], ids=["prefix-cached-on-dst", "nothing-cached"])
def test_migration_copies_only_the_blocks_the_destination_lacks(plain, cached_on_dst):
    config = MigrationConfig(last_stage_max_blocks=2)
    prefix = rand_tokens(48, seed=9)                   # 12 blocks
    prompt = prefix + rand_tokens(10, seed=10)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reference = run(plain, prompt, params)
    src, dst = tiny(), tiny()
    if cached_on_dst:
        run(dst, prefix + rand_tokens(5, seed=11), GREEDY)     # another request left the prefix cached there
    src.add_request("r", prompt_token_ids=prompt, params=params)
    got = []
    for _ in range(6):
        got += [t for o in src.step() for t in o.new_token_ids]
    transport = CountingTransport()
    record = asyncio.run(migrate_out(EngineSourcePort(src, InlineSteps(), StreamRegistry("src")),
                                     Peer(dst, config), transport, MigrationRecord("m", "r", "src", "dst"), config))
    assert record.state is MigrationState.COMMITTED, record.reason
    computed_blocks = blocks_for(len(prompt) + len(got) - 1, BS)     # the last one partly filled
    assert record.blocks_found == (12 if cached_on_dst else 0)
    assert transport.blocks_sent == computed_blocks - record.blocks_found
    dst.check_integrity()
    while dst.has_unfinished():
        got += [t for o in dst.step() for t in o.new_token_ids]
        dst.check_integrity()
    assert got == reference
    assert_clean(src, dst)


def test_an_aborted_migration_gives_the_cached_prefix_back():
    dst = tiny()
    prefix = rand_tokens(24, seed=12)
    run(dst, prefix + [1, 2, 3], GREEDY)
    hashes = block_hashes(prefix, BS, dst.config.prefix_cache_seed())
    assert dst.attach_import_prefix("imp", hashes) == 6
    dst.reserve_import("imp", 3)
    dst.check_integrity()
    with pytest.raises(ValueError, match="not reserved"):
        dst.core.import_block_ids("imp", 0, 1)          # a cached block is never written over
    dst.cancel_import("imp")
    assert_clean(dst)
    assert dst.attach_import_prefix("imp2", hashes) == 6   # still cached
    dst.cancel_import("imp2")
    assert_clean(dst)


def test_status_shows_each_instances_cached_blocks_and_hit_rate(plain):
    from orchestrator.cli import format_status
    from tidal.v1 import admin_pb2

    e = tiny()
    prefix = rand_tokens(40, seed=13)
    run(e, prefix + [1, 2], GREEDY)
    run(e, prefix + [3, 4], GREEDY)                      # 40 of its 42 tokens found cached
    rows = []
    for name, engine in (("cached", e), ("plain", plain)):
        load = engine.load()                             # as the frontend answers ListInstances
        rows.append(admin_pb2.Instance(instance_id=name, load=admin_pb2.InstanceLoad(**load.to_dict())))
    table = format_status(rows).splitlines()
    assert "CACHED" in table[0] and "PREFIX HIT" in table[0]
    cached_row = next(line for line in table if line.startswith("cached"))
    plain_row = next(line for line in table if line.startswith("plain"))
    assert f" {e.load().cached_blocks} " in cached_row and f"{round(100 * 40 / 84)}%" in cached_row
    assert " - " in plain_row
