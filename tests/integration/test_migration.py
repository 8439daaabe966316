"""Live migration between two real InstanceActors on a local Ray, with a real sink actor collecting the stream."""

import contextlib
import random
import time

import pytest
import ray

from instance.engine import Engine
from instance.sampling import SamplingParams
from migration.protocol import MigrationState
from rpc import Deadlines
from rpc.frontend import FrontendClient
from rpc.instance import InstanceClient

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

    async def request_moved(self, request_id, instance):
        self.moves.setdefault(request_id, []).append(instance.instance_id)

    async def ping(self):
        return True

    async def get(self, request_id):
        return sorted(self.chunks.get(request_id, []), key=lambda c: c.seq), self.moves.get(request_id, [])

    async def count(self, request_id) -> tuple[int, bool]:
        """Tokens received, and whether every chunk up to the final one has arrived."""
        chunks = self.chunks.get(request_id, [])
        last = [c.seq for c in chunks if c.finish_reason is not None]
        return sum(len(c.token_ids) for c in chunks), bool(last) and len(chunks) >= last[0] + 1


DEADLINES = Deadlines(call_s=30.0, startup_s=120.0)


def start_instance(name: str, engine: dict | None = None, migration: dict | None = None) -> InstanceClient:
    instance = InstanceClient.create(name, {**TINY, **(engine or {})}, {"call_timeout_s": 5.0, **(migration or {})},
                                     DEADLINES)
    instance.start().result()
    return instance


@contextlib.contextmanager
def instances(*specs: tuple[str, dict, dict]):
    """Start instance actors from (name, engine overrides, migration overrides); kill them afterwards."""
    started = [start_instance(name, engine, migration) for name, engine, migration in specs]
    try:
        yield started
    finally:
        for instance in started:
            instance.kill()


@pytest.fixture(scope="module")
def pair(ray_local):
    a, b = start_instance("inst-a"), start_instance("inst-b")
    yield a, b
    for x in (a, b):
        x.kill()


@pytest.fixture(scope="module")
def reference() -> Engine:
    return Engine(**TINY)


class SinkHandle:
    """A Sink actor: `client` is what instances push its chunks through, as through a frontend's."""

    def __init__(self):
        self.actor = ray.remote(Sink).remote()
        self.client = FrontendClient("sink", self.actor, DEADLINES)

    def received(self, rid) -> tuple[int, bool]:
        return ray.get(self.actor.count.remote(rid))

    def chunks_and_moves(self, rid) -> tuple[list, list[str]]:
        return ray.get(self.actor.get.remote(rid))


@pytest.fixture
def sink(ray_local):
    s = SinkHandle()
    yield s
    ray.kill(s.actor)


def prompt(seed: int, n: int = 40) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def wait_tokens(instance, rid, n: int, timeout: float = 30.0) -> None:
    """Until the instance holding rid has generated n tokens for it (asked directly: no stream lag)."""
    deadline = time.monotonic() + timeout
    while True:
        info = instance.request_info(rid).result()
        assert info is not None, f"{rid} is not on this instance (finished already?)"
        if info.num_output_tokens >= n:
            return
        assert time.monotonic() < deadline, f"{rid}: fewer than {n} tokens after {timeout} s"
        time.sleep(0.002)


def wait_finished(sink, rid, timeout: float = 60.0) -> list:
    deadline = time.monotonic() + timeout
    while not sink.received(rid)[1]:
        assert time.monotonic() < deadline, f"{rid} did not finish in {timeout} s"
        time.sleep(0.01)
    return sink.chunks_and_moves(rid)[0]


def assert_clean(*instances) -> None:
    for a in instances:
        a.check_integrity().result()
    deadline = time.monotonic() + 10
    while True:
        loads = [a.get_status().result().load for a in instances]
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
    a.add_request(rid, p, params, 0, sink.client).result()
    rng = random.Random(hops)
    where, other = a, b
    marks = sorted(rng.sample(range(2, params.max_tokens // 3), hops))
    for mark in marks:
        wait_tokens(where, rid, mark)
        record = where.migrate_out(rid, other).result()
        assert record.state is MigrationState.COMMITTED, record
        where, other = other, where
    chunks = wait_finished(sink, rid)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c.token_ids] == expected.new_token_ids
    assert "".join(c.text for c in chunks) == expected.text_delta
    assert len(sink.chunks_and_moves(rid)[1]) == hops
    assert {c.instance_id for c in chunks} == ({"inst-a", "inst-b"})
    assert_clean(a, b)


def test_a_long_context_moves_in_several_stages_while_it_decodes(pair, sink, reference):
    a, b = pair
    p = prompt(99, n=900)
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    expected = reference.generate([p], params)[0]
    a.add_request("long", p, params, 0, sink.client).result()
    wait_tokens(a, "long", 5)
    record = a.migrate_out("long", b).result()
    assert record.state is MigrationState.COMMITTED, record
    assert record.stage >= 1 and record.blocks_copied >= 900 // 16
    assert record.stage_blocks[-1] <= 4 + 1          # the last stage copied only a small delta
    chunks = wait_finished(sink, "long")
    assert [t for c in chunks for t in c.token_ids] == expected.new_token_ids
    assert_clean(a, b)


def test_a_waiting_request_moves_with_its_state_only(ray_local, sink, reference):
    with instances(("w-a", dict(max_num_seqs=1), {}), ("w-b", {}, {})) as (a, b):
        a.add_request("first", prompt(1), GREEDY, 0, sink.client).result()
        a.add_request("queued", prompt(2), GREEDY, 0, sink.client).result()
        wait_tokens(a, "first", 2)
        assert a.request_info("queued").result().status == "waiting"
        record = a.migrate_out("queued", b).result()
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
    a.add_request(rid, prompt(7, n=700), SamplingParams(max_tokens=1000, temperature=0.0,
                                                                       ignore_eos=True), 0, sink.client).result()
    wait_tokens(a, rid, 2)
    migration = a.migrate_out(rid, b)
    time.sleep(delay_s)
    aborts = [a.abort_request(rid), b.abort_request(rid)]   # the frontend aborts wherever it may be
    for abort in aborts:
        abort.result()
    record = migration.result()
    assert record.state.done
    time.sleep(0.2)
    assert a.request_info(rid).result() is None and b.request_info(rid).result() is None
    assert_clean(a, b)


def test_the_destination_killed_mid_copy_leaves_the_request_finishing_on_the_source(ray_local, sink, reference):
    with instances(("k-a", {}, dict(stage_pause_s=1.0)), ("k-b", {}, {})) as (a, b):
        p = prompt(11, n=600)
        # long enough to outlive the 1 s stage pause on a fast machine (tiny-llama steps in ~2 ms)
        params = SamplingParams(max_tokens=1400, temperature=0.0, ignore_eos=True)
        a.add_request("victim", p, params, 0, sink.client).result()
        wait_tokens(a, "victim", 2)
        migration = a.migrate_out("victim", b)
        deadline = time.monotonic() + 10
        while not any(m.state is MigrationState.COPYING and m.stage >= 1 for m in a.list_migrations().result()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        b.kill()
        record = migration.result()
        assert record.state is MigrationState.ABORTED_DST
        chunks = wait_finished(sink, "victim")
        assert {c.instance_id for c in chunks} == {"k-a"}
        assert [t for c in chunks for t in c.token_ids] == reference.generate([p], params)[0].new_token_ids
        assert_clean(a)


def test_the_source_killed_mid_copy_makes_the_destination_free_its_reservation(ray_local, sink):
    with instances(("s-a", {}, dict(stage_pause_s=5.0)), ("s-b", {}, dict(dst_idle_timeout_s=1.0))) as (a, b):
        a.add_request("orphan", prompt(12, n=600),
                                     SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), 0, sink.client).result()
        wait_tokens(a, "orphan", 2)
        a.migrate_out("orphan", b)
        deadline = time.monotonic() + 10
        while b.get_status().result().load.reserved_blocks == 0:
            assert time.monotonic() < deadline, "the destination never reserved blocks"
            time.sleep(0.01)
        killed_at = time.monotonic()
        a.kill()
        while b.get_status().result().load.reserved_blocks > 0:
            assert time.monotonic() - killed_at < 5.0, "the reservation outlived the idle timeout"
            time.sleep(0.05)
        assert_clean(b)


def test_the_destination_out_of_blocks_aborts_the_migration_and_nothing_leaks(ray_local, sink, reference):
    with instances(("o-a", {}, {}), ("o-b", dict(num_blocks=20, max_model_len=320), {})) as (a, b):
        p = prompt(13, n=500)
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        a.add_request("big", p, params, 0, sink.client).result()
        wait_tokens(a, "big", 2)
        record = a.migrate_out("big", b).result()
        assert record.state is MigrationState.ABORTED_DST and "blocks" in record.reason
        chunks = wait_finished(sink, "big")
        assert [t for c in chunks for t in c.token_ids] == reference.generate([p], params)[0].new_token_ids
        assert_clean(a, b)


def test_concurrent_migrations_from_one_instance(pair, sink, reference):
    a, b = pair
    ids = [f"conc-{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        a.add_request(rid, prompt(50 + i, n=100 + 40 * i), GREEDY, 0, sink.client).result()
    for rid in ids:
        wait_tokens(a, rid, 3)
    records = [call.result() for call in [a.migrate_out(rid, b) for rid in ids]]
    assert all(r.state is MigrationState.COMMITTED for r in records), records
    for i, rid in enumerate(ids):
        chunks = wait_finished(sink, rid)
        expected = reference.generate([prompt(50 + i, n=100 + 40 * i)], GREEDY)[0].new_token_ids
        assert [t for c in chunks for t in c.token_ids] == expected
    assert_clean(a, b)


def test_max_stages_zero_is_a_blocking_copy_of_every_block(ray_local, sink, reference):
    with instances(("b-a", {}, dict(max_stages=0)), ("b-b", {}, {})) as (a, b):
        p = prompt(21, n=300)
        a.add_request("blocking", p, GREEDY, 0, sink.client).result()
        wait_tokens(a, "blocking", 3)
        record = a.migrate_out("blocking", b).result()
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
            a.add_request(rid, ids, params, 0, sink.client).result()
        for rid in cases:
            wait_tokens(a, rid, 8)
            assert a.migrate_out(rid, b).result().state is MigrationState.COMMITTED
            wait_tokens(b, rid, 20)
            assert b.migrate_out(rid, a).result().state is MigrationState.COMMITTED
        for rid, params in cases.items():
            chunks = wait_finished(sink, rid, timeout=120)
            expected = ref.generate([ids], params)[0]
            assert [t for c in chunks for t in c.token_ids] == expected.new_token_ids
            assert "".join(c.text for c in chunks) == expected.text_delta
        assert_clean(a, b)
