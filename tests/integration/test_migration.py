"""Live migration between two real InstanceActors on a local Ray, with a real sink actor collecting the stream."""

import contextlib
import random
import time

import pytest
import ray

from instance.actor import InstanceActor
from instance.engine import Engine
from instance.sampling import SamplingParams
from migration.protocol import MigrationState

TINY = dict(model="tiny-llama", num_blocks=400, block_size=16, max_model_len=2048)
# long enough that a request is still running while a test moves it around (tiny-llama steps in ~2 ms)
GREEDY = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=600, temperature=0.9, top_p=0.95, top_k=40, seed=2024, ignore_eos=True)


class Sink:
    """Collects chunks per request, like a frontend stream (also told when a request moves). Ray may run an
    async actor's calls out of order, so, like the frontend, it orders chunks by seq."""

    def __init__(self):
        self.chunks: dict[str, list] = {}
        self.moves: dict[str, list[str]] = {}

    async def push_chunks(self, chunks):
        for c in chunks:
            self.chunks.setdefault(c.request_id, []).append(c)

    async def request_moved(self, request_id, instance_id, actor):
        self.moves.setdefault(request_id, []).append(instance_id)

    async def get(self, request_id):
        return sorted(self.chunks.get(request_id, []), key=lambda c: c.seq), self.moves.get(request_id, [])

    async def count(self, request_id) -> tuple[int, bool]:
        """Tokens received, and whether every chunk up to the final one has arrived."""
        chunks = self.chunks.get(request_id, [])
        last = [c.seq for c in chunks if c.finish_reason is not None]
        return sum(len(c.token_ids) for c in chunks), bool(last) and len(chunks) >= last[0] + 1


def start_instance(name: str, engine: dict | None = None, migration: dict | None = None):
    actor = ray.remote(InstanceActor).options(max_concurrency=1000).remote(
        name, {**TINY, **(engine or {})}, 1, {"call_timeout_s": 5.0, **(migration or {})})
    ray.get(actor.start.remote(), timeout=120)
    return actor


@contextlib.contextmanager
def instances(*specs: tuple[str, dict, dict]):
    """Start instance actors from (name, engine overrides, migration overrides); kill them afterwards."""
    actors = [start_instance(name, engine, migration) for name, engine, migration in specs]
    try:
        yield actors
    finally:
        for actor in actors:
            ray.kill(actor)


@pytest.fixture(scope="module")
def pair(ray_local):
    a, b = start_instance("inst-a"), start_instance("inst-b")
    yield a, b
    for x in (a, b):
        ray.kill(x)


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**TINY)


@pytest.fixture
def sink(ray_local):
    s = ray.remote(Sink).remote()
    yield s
    ray.kill(s)


def prompt(seed: int, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def wait_tokens(actor, rid, n: int, timeout: float = 30.0) -> None:
    """Until the instance holding rid has generated n tokens for it (asked directly: no stream lag)."""
    deadline = time.monotonic() + timeout
    while True:
        info = ray.get(actor.request_info.remote(rid))
        assert info is not None, f"{rid} is not on this instance (finished already?)"
        if info.num_output_tokens >= n:
            return
        assert time.monotonic() < deadline, f"{rid}: fewer than {n} tokens after {timeout} s"
        time.sleep(0.002)


def wait_finished(sink, rid, timeout: float = 60.0) -> list:
    deadline = time.monotonic() + timeout
    while not ray.get(sink.count.remote(rid))[1]:
        assert time.monotonic() < deadline, f"{rid} did not finish in {timeout} s"
        time.sleep(0.01)
    return ray.get(sink.get.remote(rid))[0]


def assert_clean(*actors) -> None:
    for a in actors:
        ray.get(a.check_integrity.remote())
    deadline = time.monotonic() + 10
    while True:
        loads = [ray.get(a.get_status.remote()).load for a in actors]
        if all(l.free_blocks == l.total_blocks and l.num_running + l.num_waiting + l.num_suspended == 0
               for l in loads):
            return
        assert time.monotonic() < deadline, f"blocks or requests left behind: {loads}"
        time.sleep(0.05)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("hops", [1, 2, 5])
def test_migrated_output_is_identical_to_the_unmigrated_output(pair, sink, reference, params, hops):
    a, b = pair
    p = prompt(hops)
    expected = reference.generate([p], params)[0]
    rid = f"hops-{hops}-{params.temperature}"
    ray.get(a.add_request.remote(rid, p, params, 0, sink))
    rng = random.Random(hops)
    where, other = (a, "inst-a"), (b, "inst-b")
    marks = sorted(rng.sample(range(2, params.max_tokens // 3), hops))
    for mark in marks:
        wait_tokens(where[0], rid, mark)
        record = ray.get(where[0].migrate_out.remote(rid, other[1], other[0]))
        assert record.state is MigrationState.COMMITTED, record
        where, other = other, where
    chunks = wait_finished(sink, rid)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == expected.new_token_ids
    assert "".join(c.text for c in chunks) == expected.text_delta
    _, moves = ray.get(sink.get.remote(rid))
    assert len(moves) == hops
    assert {c.instance_id for c in chunks} == ({"inst-a", "inst-b"})
    assert_clean(a, b)


def test_a_long_context_moves_in_several_stages_while_it_decodes(pair, sink, reference):
    a, b = pair
    p = prompt(99, n=900)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    expected = reference.generate([p], params)[0]
    ray.get(a.add_request.remote("long", p, params, 0, sink))
    wait_tokens(a, "long", 5)
    record = ray.get(a.migrate_out.remote("long", "inst-b", b))
    assert record.state is MigrationState.COMMITTED, record
    assert record.stage >= 1 and record.blocks_copied >= 900 // 16
    assert record.stage_blocks[-1] <= 4 + 1          # the last stage copied only a small delta
    chunks = wait_finished(sink, "long")
    assert [t for c in chunks for t in c.token_ids] == expected.new_token_ids
    assert_clean(a, b)


def test_a_waiting_request_moves_with_its_state_only(ray_local, sink, reference):
    with instances(("w-a", dict(max_num_seqs=1), {}), ("w-b", {}, {})) as (a, b):
        ray.get(a.add_request.remote("first", prompt(1), GREEDY, 0, sink))
        ray.get(a.add_request.remote("queued", prompt(2), GREEDY, 0, sink))
        wait_tokens(a, "first", 2)
        assert ray.get(a.request_info.remote("queued")).status == "waiting"
        record = ray.get(a.migrate_out.remote("queued", "w-b", b))
        assert record.state is MigrationState.COMMITTED and record.blocks_copied == 0
        chunks = wait_finished(sink, "queued")
        assert [t for c in chunks for t in c.token_ids] == reference.generate([prompt(2)], GREEDY)[0].new_token_ids
        wait_finished(sink, "first")
        assert_clean(a, b)


@pytest.mark.parametrize("delay_s", [0.0, 0.002, 0.01, 0.03, 0.06, 0.1])
def test_abort_at_any_point_of_a_migration_leaks_nothing(pair, sink, delay_s):
    """The client's abort lands in whatever state the migration is in (pending, copying, last stage,
    committed); afterwards the request is gone from both instances and every block is free."""
    a, b = pair
    rid = f"abort-{delay_s}"
    ray.get(a.add_request.remote(rid, prompt(7, n=700), SamplingParams(max_tokens=1000, temperature=0.0,
                                                                       ignore_eos=True), 0, sink))
    wait_tokens(a, rid, 2)
    migration = a.migrate_out.remote(rid, "inst-b", b)
    time.sleep(delay_s)
    ray.get([a.abort.remote(rid), b.abort.remote(rid)])   # the frontend aborts wherever it may be
    record = ray.get(migration)
    assert record.state.done
    time.sleep(0.2)
    assert ray.get(a.request_info.remote(rid)) is None and ray.get(b.request_info.remote(rid)) is None
    assert_clean(a, b)


def test_the_destination_killed_mid_copy_leaves_the_request_finishing_on_the_source(ray_local, sink, reference):
    with instances(("k-a", {}, dict(stage_pause_s=1.0)), ("k-b", {}, {})) as (a, b):
        p = prompt(11, n=600)
        # long enough to outlive the 1 s stage pause on a fast machine (tiny-llama steps in ~2 ms)
        params = SamplingParams(max_tokens=1400, temperature=0.0, ignore_eos=True)
        ray.get(a.add_request.remote("victim", p, params, 0, sink))
        wait_tokens(a, "victim", 2)
        migration = a.migrate_out.remote("victim", "k-b", b)
        deadline = time.monotonic() + 10
        while not any(m.state is MigrationState.COPYING and m.stage >= 1 for m in ray.get(a.list_migrations.remote())):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ray.kill(b)
        record = ray.get(migration)
        assert record.state is MigrationState.ABORTED_DST
        chunks = wait_finished(sink, "victim")
        assert {c.instance_id for c in chunks} == {"k-a"}
        assert [t for c in chunks for t in c.token_ids] == reference.generate([p], params)[0].new_token_ids
        assert_clean(a)


def test_the_source_killed_mid_copy_makes_the_destination_free_its_reservation(ray_local, sink):
    with instances(("s-a", {}, dict(stage_pause_s=5.0)), ("s-b", {}, dict(dst_idle_timeout_s=1.0))) as (a, b):
        ray.get(a.add_request.remote("orphan", prompt(12, n=600),
                                     SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), 0, sink))
        wait_tokens(a, "orphan", 2)
        a.migrate_out.remote("orphan", "s-b", b)
        deadline = time.monotonic() + 10
        while ray.get(b.get_status.remote()).load.reserved_blocks == 0:
            assert time.monotonic() < deadline, "the destination never reserved blocks"
            time.sleep(0.01)
        killed_at = time.monotonic()
        ray.kill(a)
        while ray.get(b.get_status.remote()).load.reserved_blocks > 0:
            assert time.monotonic() - killed_at < 5.0, "the reservation outlived the idle timeout"
            time.sleep(0.05)
        assert_clean(b)


def test_the_destination_out_of_blocks_aborts_the_migration_and_nothing_leaks(ray_local, sink, reference):
    with instances(("o-a", {}, {}), ("o-b", dict(num_blocks=20, max_model_len=320), {})) as (a, b):
        p = prompt(13, n=500)
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        ray.get(a.add_request.remote("big", p, params, 0, sink))
        wait_tokens(a, "big", 2)
        record = ray.get(a.migrate_out.remote("big", "o-b", b))
        assert record.state is MigrationState.ABORTED_DST and "blocks" in record.reason
        chunks = wait_finished(sink, "big")
        assert [t for c in chunks for t in c.token_ids] == reference.generate([p], params)[0].new_token_ids
        assert_clean(a, b)


def test_concurrent_migrations_from_one_instance(pair, sink, reference):
    a, b = pair
    ids = [f"conc-{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        ray.get(a.add_request.remote(rid, prompt(50 + i, n=100 + 40 * i), GREEDY, 0, sink))
    for rid in ids:
        wait_tokens(a, rid, 3)
    records = ray.get([a.migrate_out.remote(rid, "inst-b", b) for rid in ids])
    assert all(r.state is MigrationState.COMMITTED for r in records), records
    for i, rid in enumerate(ids):
        chunks = wait_finished(sink, rid)
        expected = reference.generate([prompt(50 + i, n=100 + 40 * i)], GREEDY)[0].new_token_ids
        assert [t for c in chunks for t in c.token_ids] == expected
    assert_clean(a, b)


def test_max_stages_zero_is_a_blocking_copy_of_every_block(ray_local, sink, reference):
    with instances(("b-a", {}, dict(max_stages=0)), ("b-b", {}, {})) as (a, b):
        p = prompt(21, n=300)
        ray.get(a.add_request.remote("blocking", p, GREEDY, 0, sink))
        wait_tokens(a, "blocking", 3)
        record = ray.get(a.migrate_out.remote("blocking", "b-b", b))
        assert record.state is MigrationState.COMMITTED and record.stage == 0
        assert record.stage_blocks == [record.blocks_copied] and record.blocks_copied >= 300 // 16
        chunks = wait_finished(sink, "blocking")
        assert [t for c in chunks for t in c.token_ids] == reference.generate([p], GREEDY)[0].new_token_ids
        assert_clean(a, b)


def test_smollm2_migrated_twice_gives_the_unmigrated_tokens(ray_local, sink):
    engine = dict(model="smollm2-135m", kv_cache_gib=0.15, max_model_len=1024, block_size=16)
    with instances(("sm-a", engine, {}), ("sm-b", engine, {})) as (a, b):
        ref = Engine(**engine)
        text = "The history of the tide: the moon pulls the oceans, and"
        cases = {"sm-greedy": SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True),
                 "sm-seeded": SamplingParams(max_tokens=48, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)}
        ids = ref.tokenizer.encode(text)
        for rid, params in cases.items():
            ray.get(a.add_request.remote(rid, ids, params, 0, sink))
        for rid in cases:
            wait_tokens(a, rid, 8)
            assert ray.get(a.migrate_out.remote(rid, "sm-b", b)).state is MigrationState.COMMITTED
            wait_tokens(b, rid, 20)
            assert ray.get(b.migrate_out.remote(rid, "sm-a", a)).state is MigrationState.COMMITTED
        for rid, params in cases.items():
            chunks = wait_finished(sink, rid, timeout=120)
            expected = ref.generate([ids], params)[0]
            assert [t for c in chunks for t in c.token_ids] == expected.new_token_ids
            assert "".join(c.text for c in chunks) == expected.text_delta
        assert_clean(a, b)
