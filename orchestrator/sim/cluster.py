"""A discrete-event simulation of N instances, a frontend and the global scheduler, running the real policies.

Events, in simulated seconds, taken in time order (ties in the order they were scheduled, so a run is a pure
function of its inputs and seed):
- arrival: the frontend dispatches with `choose_instance` on the last pushed load snapshots plus what it has
  sent since (`pending_requests`, `pending_blocks`), as `orchestrator/frontend.py` does;
- step end: the instance applies its step (`SimInstance.finish_step`) and starts the next one;
- observe (every `load_interval_s`): every instance's `load()` is taken and pushed to the frontend;
- rebalance (every `rebalance_interval_s`, when `migrate`): `plan_migrations` over the observed loads and
  request lists, with in-flight migrations counted and their requests left out, as the scheduler does;
- migration stages: pre-copy while the request keeps running on the source (`MigrationCost`: each stage
  reserves the new blocks on the destination and copies them), then, at the source's next step boundary,
  the request leaves the batch, the last blocks are copied (the downtime) and the destination admits it.
  A request that finishes or is preempted during pre-copy stays where it is (the reservation is released).
  A waiting request (no KV yet) has nothing to pre-copy: it leaves the source's queue at the next step
  boundary and joins the destination's after one stage's fixed cost;
- autoscale (every `autoscale.interval_s`, when `autoscale` is set): `plan_scaling` over the observed loads, as
  the scheduler's autoscale step does. A new instance serves `instance_start_s` after the decision (and is
  paid for from the decision on); the one removed stops taking requests at once and, with
  `scale_in="drain"`, is drained by migration (`plan_drain`, every rebalance tick) and stops once empty, or,
  with `scale_in="abort"` (what peers do), has whatever it still holds aborted after `abort_grace_s`.

Migration timings are a model, not a measurement: see `MigrationCost`.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from dataclasses import dataclass, field

from instance.kv_cache import OutOfBlocksError, block_hashes, blocks_for
from instance.request import RequestState
from orchestrator.policies.autoscale import AutoscaleConfig, AutoscaleMemory, plan_scaling
from orchestrator.policies.dispatch import HIGH_PRIORITY_HEADROOM, Candidate, choose_instance
from orchestrator.policies.ledger import MoveLedger
from orchestrator.policies.migration import InstanceState, MigrationPolicyConfig, plan_drain
from orchestrator.sim.cost_model import StepCostModel
from orchestrator.policies.prefix import PrefixIndex
from orchestrator.sim.instance import SIM_HASH_SEED, SimInstance


DRAIN_MOVES_IN_FLIGHT = 4       # migrations off a draining instance at once (MigrationConfig.max_concurrent)


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    token_ids: tuple[int, ...] | None = None   # the prompt, for prefix caching (None: placeholders)


@dataclass(frozen=True)
class MigrationCost:
    """Modelled cost of a live migration (assumed, not measured): each stage takes `stage_s` plus
    `block_s` per block copied; pre-copy stops when the delta is at most `last_stage_blocks` or after
    `max_stages` stages; the last stage (the request out of the batch) takes the same formula."""

    stage_s: float = 0.005
    block_s: float = 0.001
    last_stage_blocks: int = 2
    max_stages: int = 4
    reserve_upfront: bool = True      # MigrationConfig.reserve_upfront / reserve_growth_blocks
    reserve_growth_blocks: int = 2

    def seconds(self, blocks: int) -> float:
        return self.stage_s + self.block_s * blocks


@dataclass(frozen=True)
class SimConfig:
    num_instances: int = 16
    num_blocks: int = 96                  # KV blocks per instance
    block_size: int = 16
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    max_model_len: int = 2048
    dispatch: str = "freeness"            # round-robin | least-load | freeness | prefix-aware
    prefix_caching: bool = False          # EngineConfig.prefix_caching (requests then carry token_ids)
    prefix_weight: float = 1.0            # ServeConfig.dispatch_prefix_weight
    prefix_digest_blocks: int = 4096      # EngineConfig.prefix_digest_blocks
    top_k: int = 1
    high_priority_headroom: float = HIGH_PRIORITY_HEADROOM
    output_weight: float = 0.0            # ServeConfig.dispatch_output_weight
    migrate: bool = True
    migration: MigrationPolicyConfig = MigrationPolicyConfig()
    migration_cost: MigrationCost = MigrationCost()
    load_interval_s: float = 0.05
    rebalance_interval_s: float = 0.5
    seed: int = 0
    autoscale: AutoscaleConfig | None = None  # scale the instance count on load (None: num_instances, fixed)
    instance_start_s: float = 20.0            # a new instance serves this long after the decision
    scale_in: str = "drain"                   # drain (by migration) | abort (after abort_grace_s)
    abort_grace_s: float = 30.0
    scale_in_victim: str = "policy"           # policy (the least busy) | newest (as a ReplicaSet scales down)

    def __post_init__(self) -> None:
        if blocks_for(self.max_model_len, self.block_size) > self.num_blocks:
            raise ValueError(f"num_blocks {self.num_blocks} x {self.block_size} tokens cannot hold one request of "
                             f"max_model_len {self.max_model_len}; raise num_blocks or lower max_model_len")


@dataclass
class RequestRecord:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int
    first_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    migrations: int = 0
    aborted: bool = False           # on an instance removed by an abort-after-grace scale-in

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.finish_s is None or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass
class SimResult:
    records: list[RequestRecord]
    preemptions: int
    migrations: int
    migrations_aborted: int
    end_s: float
    wall_s: float
    busy_s: dict[str, float] = field(default_factory=dict)
    instance_s: float = 0.0         # instance-seconds paid for (starting and draining ones included)
    aborted: int = 0
    max_instances: int = 0
    computed_tokens: int = 0        # tokens all steps computed (prefill and decode), on every instance
    prefix_hit_tokens: int = 0      # admitted tokens found in a prefix cache
    prefix_query_tokens: int = 0    # admitted tokens (with prefix caching on)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    @property
    def finished(self) -> list[RequestRecord]:
        return [r for r in self.records if r.finish_s is not None]


@dataclass
class _Migration:
    request_id: str            # also the id of the destination's import
    src: SimInstance
    dst: SimInstance
    preemptions: int = 0       # the request's count when the migration started: a preemption aborts it
    copied_blocks: int = 0
    reserved_blocks: int = 0
    stage: int = 0


class Simulator:
    def __init__(self, config: SimConfig, cost: StepCostModel):
        self.cfg = config
        self.instances = [self._new_instance(f"instance-{i}", cost) for i in range(config.num_instances)]
        self._prefixes = PrefixIndex()
        self.by_id = {i.instance_id: i for i in self.instances}
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._events: list = []
        self._seq = itertools.count()
        self._turn = 0
        self._snapshots = {i.instance_id: i.load() for i in self.instances}
        self._requests: dict[str, list] = {}           # observed request lists, per instance
        self._pending: dict[str, list[int]] = {i.instance_id: [] for i in self.instances}  # blocks sent since
        self._pending_prefill: dict[str, list[int]] = {i.instance_id: [] for i in self.instances}  # their prefill
        self._migrating: dict[str, _Migration] = {}    # request id -> migration in flight
        self._suspend_at_step_end: dict[str, list[_Migration]] = {i.instance_id: [] for i in self.instances}
        self._ledger = MoveLedger(config.migration)
        self.records: dict[str, RequestRecord] = {}
        self.migrations = 0
        self.migrations_aborted = 0
        self._finished = 0
        self._total = 0
        self._cost = cost
        self._next_index = config.num_instances
        self._starting = 0                              # instances decided, not serving yet
        self._draining: set[str] = set()               # no longer dispatched to, on their way out
        self._abort_at_step_end: set[str] = set()
        self._scale_memory = AutoscaleMemory()
        self._instance_s = 0.0
        self._accounted_at = 0.0
        self._gone_preemptions = 0
        self._gone_busy: dict[str, float] = {}
        self.aborted = 0
        self.max_instances = config.num_instances
        self._gone_counts = [0, 0, 0]                   # computed, prefix hit, prefix query tokens of removed ones

    def _new_instance(self, instance_id: str, cost: StepCostModel) -> SimInstance:
        c = self.cfg
        return SimInstance(instance_id, c.num_blocks, c.block_size, c.max_num_batched_tokens, c.max_num_seqs,
                           c.max_model_len, cost, self._clock, prefix_caching=c.prefix_caching,
                           digest_limit=c.prefix_digest_blocks)

    # ----- the event loop --------------------------------------------------------------------------------
    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self, workload: list[SimRequest], until_s: float | None = None) -> SimResult:
        """Replay `workload` (arrivals in seconds) until every request has finished (or `until_s`)."""
        started = time.perf_counter()
        for n, w in enumerate(sorted(workload, key=lambda w: w.arrival_s)):
            if w.prompt_tokens < 1 or w.output_tokens < 1 or w.prompt_tokens + w.output_tokens > self.cfg.max_model_len:
                raise ValueError(f"request {n}: prompt {w.prompt_tokens} + output {w.output_tokens} tokens must be "
                                 f"positive and fit max_model_len {self.cfg.max_model_len}")
            self._at(w.arrival_s, self._arrive, f"req-{n}", w)
        self._at(0.0, self._observe)
        if self.cfg.migrate or self.cfg.autoscale is not None:
            self._at(self.cfg.rebalance_interval_s, self._rebalance)
        if self.cfg.autoscale is not None:
            self._at(self.cfg.autoscale.interval_s, self._autoscale)
        self._total = total = len(workload)
        while self._events and self._finished < total:
            t, _, fn, args = heapq.heappop(self._events)
            if until_s is not None and t > until_s:
                break
            self.now = t
            fn(*args)
        self._account()
        return SimResult(list(self.records.values()),
                         preemptions=self._gone_preemptions + sum(i.load().num_preemptions_total
                                                                  for i in self.instances),
                         migrations=self.migrations, migrations_aborted=self.migrations_aborted, end_s=self.now,
                         wall_s=time.perf_counter() - started,
                         busy_s={**self._gone_busy, **{i.instance_id: i.busy_s for i in self.instances}},
                         instance_s=self._instance_s, aborted=self.aborted, max_instances=self.max_instances,
                         computed_tokens=self._gone_counts[0] + sum(i.core.num_computed_total for i in self.instances),
                         prefix_hit_tokens=self._gone_counts[1] + sum(i.load().prefix_hit_tokens
                                                                      for i in self.instances),
                         prefix_query_tokens=self._gone_counts[2] + sum(i.load().prefix_query_tokens
                                                                        for i in self.instances))

    # ----- frontend --------------------------------------------------------------------------------------
    def _arrive(self, rid: str, w: SimRequest) -> None:
        cfg = self.cfg
        hashes = (block_hashes(list(w.token_ids), cfg.block_size, SIM_HASH_SEED)
                  if cfg.dispatch == "prefix-aware" and w.token_ids is not None else [])
        candidates = [Candidate(i.instance_id, self._snapshots[i.instance_id],
                                pending_requests=len(self._pending[i.instance_id]),
                                pending_blocks=sum(self._pending[i.instance_id]), batch_slots=cfg.max_num_seqs,
                                cached_blocks=self._prefixes.cached_blocks(i.instance_id, hashes),
                                pending_prefill_tokens=sum(self._pending_prefill[i.instance_id]))
                      for i in self.instances if i.instance_id not in self._draining]
        iid = choose_instance(cfg.dispatch, candidates, self._turn, self.rng, top_k=cfg.top_k,
                              high_priority_headroom=cfg.high_priority_headroom, output_weight=cfg.output_weight,
                              prompt_tokens=w.prompt_tokens, prefix_weight=cfg.prefix_weight)
        self._turn += 1
        inst = self.by_id[iid]
        self._pending[iid].append(blocks_for(w.prompt_tokens + 1, cfg.block_size))
        cached = next(c.cached_blocks for c in candidates if c.instance_id == iid)
        self._pending_prefill[iid].append(w.prompt_tokens - round(cfg.prefix_weight * cached * cfg.block_size))
        self.records[rid] = RequestRecord(rid, w.arrival_s, w.prompt_tokens, w.output_tokens, w.priority)
        inst.add(rid, w.prompt_tokens, w.output_tokens, w.priority, w.arrival_s, w.token_ids)
        self._kick(inst)

    # ----- instances -------------------------------------------------------------------------------------
    def _kick(self, inst: SimInstance) -> None:
        """Start a step on an idle instance that has work."""
        if inst.step is None:
            seconds = inst.start_step()
            if seconds is not None:
                self._at(self.now + seconds, self._step_end, inst)

    def _step_end(self, inst: SimInstance) -> None:
        if inst.instance_id not in self.by_id:
            return                                     # removed (its step was already accounted)
        for req in inst.finish_step():
            rec = self.records[req.request_id]
            if rec.first_token_s is None:
                rec.first_token_s = self.now
            if req.is_finished:
                rec.finish_s = self.now
                rec.preemptions = req.num_preemptions
                self._finished += 1
        for mig in self._suspend_at_step_end[inst.instance_id]:
            self._last_stage(mig)
        self._suspend_at_step_end[inst.instance_id].clear()
        if inst.instance_id in self._abort_at_step_end:
            return self._abort_instance(inst.instance_id)
        self._kick(inst)

    # ----- global scheduler ------------------------------------------------------------------------------
    def _observe(self) -> None:
        if (len(self.records) == self._total and not self._migrating and not self._starting
                and all(i.step is None for i in self.instances)):
            raise RuntimeError(f"simulation stuck at {self.now:.1f} s: {self._total - self._finished} requests "
                               f"unfinished and no instance can run them")
        self._snapshots = {i.instance_id: i.load() for i in self.instances}
        for iid, load in self._snapshots.items():
            self._prefixes.update(iid, load)
        self._prefixes.retain(self._snapshots)
        for pending in (*self._pending.values(), *self._pending_prefill.values()):
            pending.clear()
        self._at(self.now + self.cfg.load_interval_s, self._observe)

    def _rebalance(self) -> None:
        ins = {i: 0 for i in self.by_id}
        outs = {i: 0 for i in self.by_id}
        for m in self._migrating.values():
            outs[m.src.instance_id] += 1
            ins[m.dst.instance_id] += 1
        states = [InstanceState(i.instance_id, i.load(),
                                tuple(r for r in i.list_requests() if r.request_id not in self._migrating),
                                accepting=i.instance_id not in self._draining,
                                migrations_out=outs[i.instance_id], migrations_in=ins[i.instance_id])
                  for i in self.instances]
        if self.cfg.migrate:
            for move in self._ledger.plan([s for s in states if s.accepting], self.now):
                self._start_migration(move.request_id, self.by_id[move.src], self.by_id[move.dst])
                self._ledger.record(move, self.now)
        if self.cfg.scale_in == "drain":
            self._drain([s for s in states if not s.accepting], [s for s in states if s.accepting], outs, ins)
        self._at(self.now + self.cfg.rebalance_interval_s, self._rebalance)

    # ----- autoscaling: the scheduler's autoscale step and Scaling's two ways out --------------------------
    def _autoscale(self) -> None:
        cfg = self.cfg.autoscale
        states = [InstanceState(i.instance_id, self._snapshots[i.instance_id], (),
                                accepting=i.instance_id not in self._draining) for i in self.instances]
        decision, self._scale_memory = plan_scaling(states, {}, len(self.instances) + self._starting,
                                                    bool(self._starting or self._draining), cfg, self.now,
                                                    self._scale_memory)
        if decision is not None and decision.remove is None:
            self._account()
            self._starting += decision.target - len(self.instances)
            for _ in range(decision.target - len(self.instances)):
                self._at(self.now + self.cfg.instance_start_s, self._instance_ready)
        elif decision is not None:
            victim = decision.remove if self.cfg.scale_in_victim == "policy" else max(
                (i.instance_id for i in self.instances if i.instance_id not in self._draining),
                key=lambda iid: int(iid.rsplit("-", 1)[1]))
            self._draining.add(victim)
            if self.cfg.scale_in == "abort":
                self._at(self.now + self.cfg.abort_grace_s, self._abort_instance, victim)
        self._at(self.now + cfg.interval_s, self._autoscale)

    def _instance_ready(self) -> None:
        self._account()
        self._starting -= 1
        inst = self._new_instance(f"instance-{self._next_index}", self._cost)
        self._next_index += 1
        self.instances.append(inst)
        self.by_id[inst.instance_id] = inst
        self._snapshots[inst.instance_id] = inst.load()
        self._pending[inst.instance_id] = []
        self._pending_prefill[inst.instance_id] = []
        self._suspend_at_step_end[inst.instance_id] = []
        self.max_instances = max(self.max_instances, len(self.instances))

    def _drain(self, draining: list[InstanceState], others: list[InstanceState], outs: dict, ins: dict) -> None:
        """Move what the instances being removed hold (as `tidal drain` does); stop those that are empty."""
        for state in draining:
            inst = self.by_id[state.instance_id]
            if not inst.core.requests and outs[inst.instance_id] == 0 and ins[inst.instance_id] == 0:
                self._remove_instance(inst)
                continue
            moves, _ = plan_drain(state, others, self.cfg.migration)
            for move in moves[:max(0, DRAIN_MOVES_IN_FLIGHT - outs[inst.instance_id])]:
                self._start_migration(move.request_id, inst, self.by_id[move.dst])

    def _abort_instance(self, instance_id: str) -> None:
        """Scale-in the way peers do it: whatever the instance still holds after the grace period is lost."""
        inst = self.by_id.get(instance_id)
        if inst is None:
            return
        if inst.step is not None:
            self._abort_at_step_end.add(instance_id)        # between two steps, as an engine stops
            return
        for mig in [m for m in self._migrating.values() if inst in (m.src, m.dst)]:
            self._abort(mig)
        for rid in list(inst.core.requests):
            inst.core.abort(rid)
            self.records[rid].aborted = True
            self.aborted += 1
            self._finished += 1
        self._remove_instance(inst)

    def _remove_instance(self, inst: SimInstance) -> None:
        self._account()
        iid = inst.instance_id
        self._gone_preemptions += inst.load().num_preemptions_total
        self._gone_busy[iid] = inst.busy_s
        load = inst.load()
        for k, v in enumerate((inst.core.num_computed_total, load.prefix_hit_tokens, load.prefix_query_tokens)):
            self._gone_counts[k] += v
        self.instances.remove(inst)
        for table in (self.by_id, self._snapshots, self._pending, self._pending_prefill, self._suspend_at_step_end):
            table.pop(iid, None)
        self._draining.discard(iid)
        self._abort_at_step_end.discard(iid)

    def _account(self) -> None:
        """Add the instance-seconds since the last change of the instance count."""
        self._instance_s += (len(self.instances) + self._starting) * (self.now - self._accounted_at)
        self._accounted_at = self.now

    def _clock(self) -> float:
        return self.now

    # ----- live migration: the same engine hooks the real migration calls ----------------------------------
    def _start_migration(self, request_id: str, src: SimInstance, dst: SimInstance) -> None:
        info = src.core.request_info(request_id)
        mig = _Migration(request_id, src, dst, preemptions=info.num_preemptions)
        self._migrating[request_id] = mig
        cost = self.cfg.migration_cost
        # what the destination caches of the request's prefix is not copied (as in migration.source)
        found = dst.core.attach_import_prefix(request_id, src.core.prefix_hashes(
            request_id, info.num_computed_tokens // self.cfg.block_size))
        mig.reserved_blocks = mig.copied_blocks = found
        if cost.reserve_upfront and not self._reserve(mig, blocks_for(info.num_tokens, self.cfg.block_size)
                                                      + cost.last_stage_blocks + cost.reserve_growth_blocks):
            return self._abort(mig)
        self._stage(mig)

    def _stage(self, mig: _Migration) -> None:
        """Pre-copy what has been computed since the last stage, while the request keeps running."""
        computed = self._movable_tokens(mig)
        if computed is None:
            return self._abort(mig)
        delta = blocks_for(computed, self.cfg.block_size) - mig.copied_blocks
        cost = self.cfg.migration_cost
        if delta <= cost.last_stage_blocks or mig.stage >= cost.max_stages:
            if mig.src.step is None:
                return self._last_stage(mig)
            self._suspend_at_step_end[mig.src.instance_id].append(mig)
            return
        if not self._reserve(mig, mig.copied_blocks + delta):
            return self._abort(mig)
        mig.copied_blocks += delta
        mig.stage += 1
        self._at(self.now + cost.seconds(delta), self._stage, mig)

    def _last_stage(self, mig: _Migration) -> None:
        """Between two steps of the source: take the request out of its batch and copy what is left."""
        computed = self._movable_tokens(mig)
        if computed is None:
            return self._abort(mig)
        need = blocks_for(computed, self.cfg.block_size) - mig.copied_blocks
        if not self._reserve(mig, mig.copied_blocks + need):
            return self._abort(mig)
        state = mig.src.core.suspend(mig.request_id)
        self._at(self.now + self.cfg.migration_cost.seconds(max(0, need)), self._commit, mig, state)

    def _commit(self, mig: _Migration, state: RequestState) -> None:
        mig.src.core.free_suspended(mig.request_id)
        mig.dst.core.commit_import(mig.request_id, state)
        del self._migrating[mig.request_id]
        self.records[mig.request_id].migrations += 1
        self.migrations += 1
        self._kick(mig.dst)
        self._kick(mig.src)

    def _reserve(self, mig: _Migration, blocks: int) -> bool:
        """Make sure the first `blocks` blocks of the request are reserved on the destination."""
        if blocks <= mig.reserved_blocks:
            return True
        try:
            mig.dst.core.reserve_import(mig.request_id, blocks - mig.reserved_blocks)
        except OutOfBlocksError:
            return False
        mig.reserved_blocks = blocks
        return True

    def _movable_tokens(self, mig: _Migration) -> int | None:
        """The request's computed tokens if it is still on the source, running or waiting, and not preempted
        since the migration started; None if it cannot move any more."""
        info = mig.src.core.request_info(mig.request_id)
        if info is None or info.num_preemptions != mig.preemptions or info.status not in ("running", "waiting"):
            return None
        return info.num_computed_tokens

    def _abort(self, mig: _Migration) -> None:
        mig.dst.core.cancel_import(mig.request_id)
        del self._migrating[mig.request_id]
        self.migrations_aborted += 1


def simulate(workload: list[SimRequest], config: SimConfig, cost: StepCostModel,
             until_s: float | None = None) -> SimResult:
    return Simulator(config, cost).run(workload, until_s)
