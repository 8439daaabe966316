"""The global scheduler's reconcile loop and admin commands, in-process, over fake instance and frontend clients
and an in-memory state store: dead and silent instances, drains, restart recovery, a store outage, a failing
step. (tests/e2e covers the same over real Ray actors.)"""

import asyncio
import logging

import pytest

from instance.backend import LoadSnapshot, RequestInfo
from instance.config import EngineConfig
from instance.messages import InstanceInfo, InstanceStatus
from migration.protocol import MigrationRecord, MigrationState
from orchestrator.fleet import DEAD, DRAINING, SERVING
from orchestrator.registry import MAX_PUSH_FAILURES
from orchestrator.scheduler import GlobalScheduler
from orchestrator.store import StateStore, StoreError
from rpc import ActorDead, ActorTimeout

BS = 16
TOTAL = 100


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemoryStore(StateStore):
    """A state store in a dict; `down` makes every call fail as an unreachable store does."""

    url = "memory"

    def __init__(self):
        self.data: dict[str, dict] = {}
        self.down = False

    def _check(self):
        if self.down:
            raise StoreError("memory store is down")

    def get(self, key):
        self._check()
        return self.data.get(key)

    def put(self, key, value):
        self._check()
        self.data[key] = dict(value)

    def delete(self, key):
        self._check()
        self.data.pop(key, None)

    def scan(self, prefix=""):
        self._check()
        return {k: v for k, v in sorted(self.data.items()) if k.startswith(prefix)}


def running(rid: str, tokens: int = 40) -> RequestInfo:
    return RequestInfo(request_id=rid, status="running", num_tokens=tokens, num_prompt_tokens=tokens - 8,
                       num_output_tokens=8, max_tokens=200, num_computed_tokens=tokens - 1, priority=0,
                       num_preemptions=0)


class FakeInstance:
    """An instance client whose instance holds `requests`; `poll` decides what a status poll does."""

    def __init__(self, instance_id: str):
        self.instance_id = instance_id
        self.actor = object()
        self.requests: dict[str, RequestInfo] = {}
        self.poll = "ok"               # ok | dead | hang | error
        self.killed = False
        self.started = 0
        self.peers: dict[str, "FakeInstance"] = {}

    async def start(self):
        self.started += 1
        if self.killed:
            raise ActorDead(self.instance_id, "start", "ActorDiedError")
        return InstanceInfo(self.instance_id, "node-" + self.instance_id, "10.0.0.1", "tiny-llama", 1024, 256)

    async def get_status(self):
        if self.killed or self.poll == "dead":
            raise ActorDead(self.instance_id, "get_status", "ActorDiedError")
        if self.poll == "hang":
            await asyncio.Event().wait()
        if self.poll == "error":
            raise ActorTimeout(self.instance_id, "get_status", "no answer within 30 s")
        return self.status()

    def status(self) -> InstanceStatus:
        used = sum(-(-r.num_tokens // BS) for r in self.requests.values())
        load = LoadSnapshot(total_blocks=TOTAL, free_blocks=TOTAL - used, used_blocks=used, reserved_blocks=0,
                            block_size=BS, num_running=len(self.requests), num_waiting=0, num_preempted=0,
                            num_suspended=0, head_demand_blocks=0, waiting_demand_blocks=0,
                            running_tokens=sum(r.num_tokens for r in self.requests.values()), step_time_ms=1.0,
                            tokens_per_s=100.0, num_preemptions_total=0)
        return InstanceStatus(self.instance_id, load, 1, len(self.requests), tuple(self.requests.values()))

    def kill(self):
        self.killed = True

    async def request_info(self, rid):
        return self.requests.get(rid)

    async def list_migrations(self):
        return []

    async def migrate_out(self, rid, dst, migration_id=None, handoff=False):
        record = MigrationRecord(migration_id or "m", rid, self.instance_id, dst.instance_id)
        req = self.requests.pop(rid, None)
        if req is None:
            record.state = MigrationState.ENDED
        else:
            dst.requests[rid] = req
            record.state = MigrationState.COMMITTED
        return record


class FakeInstances:
    """The instance factory: creates fakes, and finds those still alive by id (as Ray finds actors by name).
    `failing` creations raise, and `dying` ones die while they start."""

    def __init__(self):
        self.alive: dict[str, FakeInstance] = {}
        self.created: list[str] = []
        self.failing = 0
        self.dying = 0

    def create(self, instance_id):
        self.created.append(instance_id)
        if self.failing:
            self.failing -= 1
            raise ValueError(f"the actor name {instance_id} is already taken")
        if self.dying:
            self.dying -= 1
            self.alive[instance_id] = FakeInstance(instance_id)
            self.alive[instance_id].killed = True
            return self.alive[instance_id]
        self.alive[instance_id] = FakeInstance(instance_id)
        return self.alive[instance_id]

    def find(self, instance_id):
        inst = self.alive.get(instance_id)
        return inst if inst is not None and not inst.killed else None

    def request_capacity(self, instances):
        self.capacity = instances


class FakeFrontend:
    def __init__(self, name="fe", fail=None):
        self.name = name
        self.tables: list[list] = []
        self.fail = fail               # None, or the error every push raises

    async def update_instances(self, views, control=None):
        if self.fail is not None:
            raise self.fail
        self.tables.append(views)
        self.store = control.store if control is not None else None

    def states(self) -> dict[str, str]:
        return {v.instance_id: v.state for v in self.tables[-1]}


def config(**kw) -> dict:
    return {"engine": EngineConfig(model="tiny-llama").model_dump(), "instances": 2, "instance_timeout_s": 5.0,
            "load_interval_s": 0.01, "rebalance": {"auto": False}, **kw}


async def rounds(sched: GlobalScheduler, n: int = 3, clock: Clock | None = None) -> None:
    """n reconcile rounds, with the event loop running the polls in between (and `clock` a second on)."""
    for _ in range(n):
        if clock is not None:
            clock.now += 1.0
        sched.reconciler.run_once()
        for _ in range(5):
            await asyncio.sleep(0)


def scheduler(store=None, factory=None, clock=None, **kw) -> tuple[GlobalScheduler, FakeInstances, MemoryStore]:
    factory, store = factory or FakeInstances(), store or MemoryStore()
    sched = GlobalScheduler(config(**kw), instances=factory, store=store, clock=clock or Clock(), run_loop=False)
    return sched, factory, store


async def started(**kw) -> tuple[GlobalScheduler, FakeInstances, MemoryStore, FakeFrontend]:
    """A started scheduler with one registered frontend."""
    sched, factory, store = scheduler(**kw)
    await sched.start()
    fe = FakeFrontend()
    await sched.register_frontend("fe", fe)
    return sched, factory, store, fe


def test_a_dead_instance_is_fenced_and_frontends_see_it_dead():
    async def scenario():
        sched, factory, _, fe = await started()
        await rounds(sched)
        assert fe.states() == {"instance-0": SERVING, "instance-1": SERVING}
        factory.alive["instance-1"].poll = "dead"
        await rounds(sched)
        assert fe.states() == {"instance-0": SERVING, "instance-1": DEAD}
        assert factory.alive["instance-1"].killed and not factory.alive["instance-0"].killed

    asyncio.run(scenario())


@pytest.mark.parametrize("poll", ["hang", "error"])
def test_an_instance_without_a_status_for_instance_timeout_is_declared_dead(poll):
    """Whether its polls hang or keep failing, an instance that reports nothing for instance_timeout_s is
    fenced; one that is just slow for less than that is not."""
    async def scenario():
        clock = Clock()
        sched, factory, _ = scheduler(clock=clock)
        await sched.start()
        await rounds(sched)
        factory.alive["instance-0"].poll = poll
        clock.now += 4.0
        await rounds(sched)
        assert sched.fleet.members["instance-0"].state == SERVING       # 4 s of silence: under the timeout
        clock.now += 2.0
        await rounds(sched)
        assert sched.fleet.members["instance-0"].state == DEAD           # 6 s
        assert sched.fleet.members["instance-1"].state == SERVING        # it answered all along

    asyncio.run(scenario())


def test_a_drain_moves_every_request_stores_the_intent_and_tells_frontends_first():
    async def scenario():
        sched, factory, store, fe = await started()
        src = factory.alive["instance-0"]
        for i in range(3):
            src.requests[f"r{i}"] = running(f"r{i}")
        await rounds(sched)
        report = await sched.drain("instance-0")
        assert report.remaining == 0 and sorted(r.request_id for r in report.moved) == ["r0", "r1", "r2"]
        assert sorted(factory.alive["instance-1"].requests) == ["r0", "r1", "r2"]
        assert fe.states()["instance-0"] == DRAINING
        assert store.data["instance/instance-0"]["state"] == DRAINING and "op/drain/instance-0" not in store.data
        assert await sched.undrain("instance-0") == SERVING and store.data["instance/instance-0"]["state"] == SERVING

    asyncio.run(scenario())


def test_a_restarted_scheduler_refinds_its_instances_with_their_state_and_roles():
    async def scenario():
        store, factory = MemoryStore(), FakeInstances()
        first, _, _ = scheduler(store, factory, instances=3)
        await first.start()
        await first.set_role("instance-1", "decode")
        await first.drain("instance-2")
        factory.alive["instance-0"].kill()                   # died while no scheduler ran
        second, _, _ = scheduler(store, factory, instances=3)  # what Ray restarts: same config, same store
        await second.start()
        members = second.fleet.members
        assert {i: (m.state, m.role) for i, m in members.items()} == {
            "instance-0": (DEAD, "both"), "instance-1": (SERVING, "decode"), "instance-2": (DRAINING, "both")}
        assert factory.created == ["instance-0", "instance-1", "instance-2"]     # nothing created twice
        assert factory.alive["instance-1"].started == 2                          # re-found and asked again

    asyncio.run(scenario())


def test_a_store_outage_pauses_writes_of_intent_and_they_catch_up():
    async def scenario():
        sched, _, store = scheduler()
        await sched.start()
        store.down = True
        assert await sched.set_role("instance-0", "prefill") == "both"      # the command still works ...
        report = await sched.drain("instance-1")                            # ... and so does a drain
        assert report.remaining == 0 and sched.intent.pending
        await rounds(sched)
        assert store.data["instance/instance-0"]["role"] == "both"          # not written yet
        store.down = False
        await rounds(sched)
        for _ in range(200):                                                 # the writes run in a thread
            if not sched.intent.pending:
                break
            await asyncio.sleep(0.01)
        assert not sched.intent.pending
        assert store.data["instance/instance-0"]["role"] == "prefill"
        assert store.data["instance/instance-1"]["state"] == DRAINING and "op/drain/instance-1" not in store.data

    asyncio.run(scenario())


def test_a_failing_step_does_not_stop_the_others_and_background_failures_are_logged(caplog):
    async def scenario():
        sched, factory, _, fe = await started(rebalance=dict(auto=True, interval_s=0.01))

        def broken():
            raise RuntimeError("policy bug")

        sched.moves.plan_rebalance = broken
        factory.alive["instance-1"].poll = "dead"
        with caplog.at_level(logging.ERROR):
            await rounds(sched)
            sched.tasks.spawn("doomed", _fail())
            await asyncio.sleep(0.01)
        assert fe.states()["instance-1"] == DEAD                  # observe and broadcast ran after the failure
        assert set(sched.reconciler.step_timings_ms) == {"observe", "rebalance", "pd", "repair", "autoscale",
                                                         "checkpoint", "broadcast"}
        assert "reconcile step rebalance failed" in caplog.text
        assert "scheduler: doomed failed" in caplog.text

    async def _fail():
        raise ValueError("lost task")

    asyncio.run(scenario())


def test_frontends_that_are_gone_or_keep_failing_are_unregistered():
    async def scenario():
        sched, _, _ = scheduler()
        await sched.start()
        await sched.register_frontend("gone", FakeFrontend(fail=ActorDead("gone", "update_instances", "dead")))
        await sched.register_frontend("stuck", FakeFrontend(fail=ActorTimeout("stuck", "update_instances", "slow")))
        await sched.register_frontend("ok", FakeFrontend())
        await rounds(sched, 3)
        assert set(sched.frontends.frontends) == {"stuck", "ok"}
        await rounds(sched, MAX_PUSH_FAILURES + 1)
        assert set(sched.frontends.frontends) == {"ok"}

    asyncio.run(scenario())


def test_rebalance_moves_work_from_a_loaded_instance_and_the_moved_request_cools_down():
    async def scenario():
        clock = Clock()
        sched, factory, _ = scheduler(clock=clock, rebalance=dict(auto=True, interval_s=0.5, max_moves=1))
        await sched.start()
        busy = factory.alive["instance-0"]
        for i in range(9):
            busy.requests[f"r{i}"] = running(f"r{i}", tokens=160)       # 90 of 100 blocks
        await rounds(sched, 2, clock)
        moved = set(factory.alive["instance-1"].requests)
        assert len(moved) == 1
        assert set(sched.moves.ledger.request_moved_at) == moved

    asyncio.run(scenario())


def test_a_scheduler_restarted_while_the_store_is_down_recovers_from_a_frontends_table_and_writes_it_back():
    async def scenario():
        store, factory = MemoryStore(), FakeInstances()
        first, _, _ = scheduler(store, factory, instances=3)
        await first.start()
        await first.set_role("instance-1", "decode")
        await first.drain("instance-2")
        table = first.fleet.views()                          # what a frontend last received
        store.down = True
        second, _, _ = scheduler(store, factory, instances=3)  # Ray restarts it; its store does not answer
        fe = FakeFrontend()
        await second.register_frontend("fe", fe, table)
        await rounds(second)
        assert {v.instance_id: (v.state, v.role) for v in fe.tables[-1]} == {
            "instance-0": (SERVING, "both"), "instance-1": (SERVING, "decode"), "instance-2": (DRAINING, "both")}
        assert factory.created == ["instance-0", "instance-1", "instance-2"]     # found again, not created
        assert not fe.store.reachable and "down" in fe.store.error
        store.data.clear()                                   # whatever it held is older than the table
        store.down = False
        for _ in range(100):
            await rounds(second, 1)
            if store.data.get("instance/instance-2", {}).get("state") == DRAINING:
                break
            await asyncio.sleep(0.01)
        assert store.data["instance/instance-1"]["role"] == "decode"
        assert store.data["instance/instance-2"]["state"] == DRAINING
        await rounds(second, 1)
        assert fe.store.reachable

    asyncio.run(scenario())


def test_without_the_store_or_a_table_it_recovers_by_name_and_adopts_the_stored_intent_once_back():
    async def scenario():
        store, factory = MemoryStore(), FakeInstances()
        first, _, _ = scheduler(store, factory, instances=3)
        await first.start()
        await first.set_role("instance-1", "decode")
        await first.drain("instance-2")
        store.down = True
        second, _, _ = scheduler(store, factory, instances=3)
        await second.start()
        assert {i: (m.state, m.role) for i, m in second.fleet.members.items()} == {
            "instance-0": (SERVING, "both"), "instance-1": (SERVING, "both"), "instance-2": (SERVING, "both")}
        assert factory.created == ["instance-0", "instance-1", "instance-2"]
        store.down = False
        for _ in range(100):
            await rounds(second, 1)
            if second.fleet.intent_known:
                break
            await asyncio.sleep(0.01)
        assert {i: (m.state, m.role) for i, m in second.fleet.members.items()} == {
            "instance-0": (SERVING, "both"), "instance-1": (SERVING, "decode"), "instance-2": (DRAINING, "both")}

    asyncio.run(scenario())


def test_a_replacement_that_fails_or_dies_while_starting_is_retried_with_backoff(monkeypatch):
    import orchestrator.fleet as fleet

    monkeypatch.setattr(fleet, "REPLACE_DELAY_S", 0.01)
    waits = []
    real_sleep = asyncio.sleep

    async def sleep(seconds, *args):
        if seconds >= 0.01:
            waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(fleet.asyncio, "sleep", sleep)

    async def scenario():
        sched, factory, _ = scheduler(restart_dead_instances=True)
        await sched.start()
        factory.alive["instance-0"].poll = "dead"
        factory.failing, factory.dying = 1, 1            # the name is still taken, then it dies while starting
        await rounds(sched, 2)
        assert sched.fleet.members["instance-0"].state == DEAD
        for _ in range(50):
            await rounds(sched, 1)
            if sched.fleet.members["instance-0"].state == SERVING:
                break
        assert sched.fleet.members["instance-0"].state == SERVING
        assert factory.created.count("instance-0") == 4        # the first, a refused one, one that died, the last
        assert waits[:3] == [0.01, 0.02, 0.04]                 # each retry waits twice as long
        assert sched.fleet.members["instance-0"].replace_attempts == 0

    asyncio.run(scenario())


@pytest.fixture
def quick_scaling(monkeypatch):
    import orchestrator.scaling as scaling

    monkeypatch.setattr(scaling, "SETTLE_S", 0.01)
    monkeypatch.setattr(scaling, "EMPTY_POLL_S", 0.01)


def test_scaling_out_and_in_adds_instances_and_drains_the_least_busy_one_before_stopping_it(quick_scaling):
    async def scenario():
        sched, factory, store, fe = await started(instances=2)
        report = await sched.scale_instances(3)
        assert (report.previous, report.target, report.added) == (2, 3, ["instance-2"]) and factory.capacity == 3
        assert fe.states() == {"instance-0": SERVING, "instance-1": SERVING, "instance-2": SERVING}
        assert "instance/instance-2" in store.data and "op/scale" not in store.data
        factory.alive["instance-0"].requests = {"a": running("a"), "b": running("b")}
        factory.alive["instance-1"].requests = {"c": running("c")}
        await rounds(sched)
        report = await sched.scale_instances(1)
        assert report.removed == ["instance-2", "instance-1"]          # the least busy first, one at a time
        assert set(sched.fleet.members) == {"instance-0"}
        assert sorted(factory.alive["instance-0"].requests) == ["a", "b", "c"]   # c moved, nothing aborted
        assert factory.alive["instance-1"].killed and factory.alive["instance-2"].killed
        assert sorted(k for k in store.data if k.startswith("instance/")) == ["instance/instance-0"]
        assert fe.states() == {"instance-0": SERVING}

    asyncio.run(scenario())


def test_scaling_refuses_out_of_range_targets_and_a_second_operation():
    from orchestrator.errors import AdminError

    async def scenario():
        sched, _, _, _ = await started(autoscale=dict(max_instances=4))
        for bad in (0, 5):
            with pytest.raises(AdminError) as err:
                await sched.scale_instances(bad)
            assert err.value.code == "INVALID_ARGUMENT" and "1 to 4" in err.value.message
        assert (await sched.scale_instances(2)).reason == "already at the target"

    asyncio.run(scenario())


def test_a_restarted_scheduler_finishes_the_scale_in_it_was_doing(quick_scaling):
    async def scenario():
        store, factory = MemoryStore(), FakeInstances()
        first, _, _ = scheduler(store, factory, instances=3)
        await first.start()
        await first.intent.start_scale(2, [], "instance-1", "operator asked for 2 instances")
        await first.fleet.save(first.fleet.members["instance-1"])      # ... and then the scheduler died
        factory.alive["instance-1"].requests = {"r": running("r")}
        second, _, _ = scheduler(store, factory, instances=3)
        await second.start()
        for _ in range(200):
            if "op/scale" not in store.data:
                break
            await asyncio.sleep(0.01)
        assert set(second.fleet.members) == {"instance-0", "instance-2"}
        assert "r" in factory.alive["instance-0"].requests or "r" in factory.alive["instance-2"].requests
        assert "instance/instance-1" not in store.data

    asyncio.run(scenario())


def test_the_autoscaler_adds_an_instance_once_the_load_stayed_high(quick_scaling):
    async def scenario():
        clock = Clock()
        sched, factory, _, fe = await started(clock=clock, instances=1, autoscale=dict(
            enabled=True, scale_up_delay_s=5, scale_down_delay_s=100, cooldown_s=10, interval_s=1, max_instances=3))
        factory.alive["instance-0"].requests = {f"r{i}": running(f"r{i}", tokens=150) for i in range(10)}
        await rounds(sched, 3, clock)                        # 3 s of a full instance: not yet
        assert len(sched.fleet.members) == 1
        await rounds(sched, 4, clock)
        for _ in range(100):
            if len(sched.fleet.members) == 2 and sched.fleet.members["instance-1"].state == SERVING:
                break
            await asyncio.sleep(0.01)
        assert sched.fleet.members["instance-1"].state == SERVING
        status = sched.scaling.status()
        assert status.autoscale and status.target == 2 and "average freeness" in status.last_decision

    asyncio.run(scenario())
