"""The simulator: instances that admit and preempt like the engine, a fitted step cost model, deterministic runs."""

import json
import random
from dataclasses import replace

import pytest

from benchmarks.step_costs import fit
from instance.engine import Engine
from instance.sampling import SamplingParams
from orchestrator.sim.cluster import SimConfig, SimRequest, simulate
from orchestrator.sim.cost_model import DEFAULT_PATH, StepCostModel, StepWork, step_work
from orchestrator.sim.instance import SimInstance

COST = StepCostModel(step_s=0.01, tokens_s=0.001, samples_s=0.0005, decode_attn_s=1e-6, prefill_attn_s=1e-7)


def test_a_simulated_instance_admits_preempts_and_reports_load_exactly_like_the_engine():
    cfg = dict(block_size=4, num_blocks=24, max_num_batched_tokens=16, max_num_seqs=4)
    # the simulated instance caches no prefixes by default (its requests' tokens are placeholders): nor does this
    engine = Engine(model="tiny-llama", max_model_len=64, prefix_caching=False, **cfg)
    sim = SimInstance("s", cfg["num_blocks"], cfg["block_size"], cfg["max_num_batched_tokens"],
                      cfg["max_num_seqs"], 64, COST, clock=lambda: 0.0)
    rng = random.Random(3)
    shapes = [(rng.randint(3, 30), rng.randint(2, 20), rng.choice((0, 0, 1))) for _ in range(10)]
    for i, (prompt, out, prio) in enumerate(shapes):
        engine.add_request(f"r{i}", prompt_token_ids=[5] * prompt, priority=prio, arrival_time=float(i),
                           params=SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True))
        sim.add(f"r{i}", prompt, out, prio, float(i))
    timing = ("step_time_ms", "tokens_per_s", "head_wait_s")     # on each one's own clock
    steps = 0
    while engine.has_unfinished():
        engine.step()
        assert sim.start_step() is not None
        sim.finish_step()
        steps += 1
        real, simulated = engine.load().__dict__, sim.load().__dict__
        assert {k: v for k, v in real.items() if k not in timing} == \
               {k: v for k, v in simulated.items() if k not in timing}, f"step {steps}"
        assert engine.list_requests() == sim.list_requests()
        sim.check_integrity()
    assert not sim.has_work() and sim.start_step() is None
    assert engine.load().num_preemptions_total > 0             # the case includes preemption
    assert any(p for _, _, p in shapes)                        # ... and priorities


def test_step_cost_is_linear_in_the_work_the_scheduler_decided():
    inst = SimInstance("s", 64, 4, 32, 8, 64, COST, clock=lambda: 0.0)
    inst.add("long", 20, 5, 0, 0.0)
    seconds = inst.start_step()                                 # a 20-token prefill chunk, context end 20
    assert seconds == pytest.approx(0.01 + 0.001 * 20 + 0.0005 + 1e-7 * 20 * 20)
    inst.finish_step()
    inst.add("short", 6, 5, 0, 1.0)
    work = step_work(inst.core.schedule().chunks)           # long decodes at 21, short prefills 6
    assert work == StepWork(tokens=7, samples=2, decode_attn=21, prefill_attn=36)


def test_fit_recovers_the_coefficients_of_noiseless_steps():
    rng = random.Random(0)
    points = []
    for _ in range(30):
        w = StepWork(tokens=rng.randint(1, 512), samples=rng.randint(1, 64), decode_attn=rng.randint(0, 30000),
                     prefill_attn=rng.randint(0, 200000))
        points.append({"work": w.as_dict(), "seconds": COST.work_seconds(w)})
    got = fit(points)
    for k, v in COST.to_dict().items():
        assert getattr(got, k) == pytest.approx(v, rel=1e-6)


def test_the_cost_model_loads_from_its_json_and_a_missing_file_says_how_to_make_it(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"coefficients": COST.to_dict(), "machine": {}}))
    assert StepCostModel.load(path) == COST
    with pytest.raises(FileNotFoundError, match="benchmarks.step_costs"):
        StepCostModel.load(tmp_path / "none.json")


def test_the_measured_cost_model_is_committed_with_where_it_comes_from():
    record = json.loads(DEFAULT_PATH.read_text())
    assert {"machine", "date", "command", "points"} <= set(record)
    model = StepCostModel.load()
    assert model.work_seconds(StepWork(tokens=64, samples=64, decode_attn=64 * 256)) > \
           model.work_seconds(StepWork(tokens=1, samples=1, decode_attn=256)) > 0


def bursty(n=240, seed=0, high_share=0.0):
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(20.0) * (8 if rng.random() < 0.1 else 0.3)
        out.append(SimRequest(t, rng.randint(8, 200), rng.randint(2, 60), int(rng.random() < high_share)))
    return out


SMALL = SimConfig(num_instances=4, num_blocks=40, max_model_len=256, max_num_batched_tokens=128, top_k=2)


def summary(res):
    return ([(r.request_id, r.first_token_s, r.finish_s, r.preemptions, r.migrations) for r in res.records],
            res.preemptions, res.migrations, res.migrations_aborted, res.end_s)


def test_a_run_is_a_function_of_its_workload_and_seed():
    wl = bursty()
    a, b = simulate(wl, SMALL, COST), simulate(wl, SMALL, COST)
    assert summary(a) == summary(b)
    assert a.migrations > 0 and a.preemptions > 0          # the run exercises migration and preemption
    assert summary(simulate(wl, replace(SMALL, seed=1), COST)) != summary(a)   # top_k=2: the seed matters


def test_every_request_finishes_once_with_its_length_and_every_block_comes_back():
    from orchestrator.sim.cluster import Simulator

    wl = bursty(seed=2)
    sim = Simulator(SMALL, COST)
    res = sim.run(wl)
    assert len(res.finished) == len(wl)
    assert sorted((r.prompt_tokens, r.output_tokens) for r in res.records) == \
           sorted((w.prompt_tokens, w.output_tokens) for w in wl)
    assert all(r.arrival_s < r.first_token_s <= r.finish_s for r in res.records)
    for inst in sim.instances:
        inst.check_integrity()
        assert inst.load().free_blocks == SMALL.num_blocks and not inst.list_requests()


def test_migration_takes_load_off_an_instance_that_round_robin_overloaded():
    # every other request is long: round-robin puts all long ones on instance-0 and -2 of four
    wl = [SimRequest(0.05 * i, 200 if i % 2 == 0 else 10, 40 if i % 2 == 0 else 5) for i in range(120)]
    rr = replace(SMALL, dispatch="round-robin", migrate=False)
    still = simulate(wl, rr, COST)
    moved = simulate(wl, replace(rr, migrate=True), COST)
    assert still.migrations == 0 and moved.migrations > 0
    worst = lambda res: max(r.ttft_s for r in res.records)   # noqa: E731
    assert worst(moved) < 0.75 * worst(still)                # the long ones queue on two instances without it
    assert moved.end_s < still.end_s


def test_high_priority_requests_finish_sooner_than_normal_ones_of_the_same_run():
    res = simulate(bursty(n=300, seed=4, high_share=0.2), SMALL, COST)
    per_token = {p: [r.e2e_s / (r.prompt_tokens + r.output_tokens) for r in res.records if r.priority == p]
                 for p in (0, 1)}
    mean = {p: sum(v) / len(v) for p, v in per_token.items()}
    assert mean[1] < mean[0]


def test_a_config_whose_cache_cannot_hold_one_request_is_refused():
    with pytest.raises(ValueError, match="max_model_len"):
        SimConfig(num_blocks=8, max_model_len=2048)
    with pytest.raises(ValueError, match="fit max_model_len"):
        simulate([SimRequest(0.0, 250, 10)], SMALL, COST)


def test_the_autoscaler_adds_instances_for_a_burst_and_drains_them_afterwards_without_losing_a_request():
    from orchestrator.policies.autoscale import AutoscaleConfig

    rng = random.Random(5)
    quiet = [SimRequest(2.0 * i, rng.randint(8, 60), rng.randint(4, 20)) for i in range(20)]
    burst = [SimRequest(40 + 0.02 * i, rng.randint(50, 180), rng.randint(20, 60)) for i in range(400)]
    after = [SimRequest(60 + 0.5 * i, rng.randint(8, 60), rng.randint(80, 120)) for i in range(160)]  # steady
    auto = AutoscaleConfig(enabled=True, low_freeness=5, high_freeness=30, scale_up_delay_s=2, scale_down_delay_s=20,
                           cooldown_s=2, min_instances=1, max_instances=4)
    cfg = replace(SMALL, num_instances=1, autoscale=auto, instance_start_s=3.0, migrate=False)
    workload = quiet + burst + after
    drained = simulate(workload, cfg, COST)
    assert drained.max_instances == 4 and drained.aborted == 0
    assert len(drained.finished) == len(workload)                        # every request finished, none lost
    fixed = simulate(workload, replace(SMALL, num_instances=4, migrate=False), COST)
    assert fixed.instance_s == pytest.approx(4 * fixed.end_s)
    assert drained.instance_s < 0.85 * fixed.instance_s                # paid for fewer instance-seconds
    # an autoscaler eager to scale in (busy instances go): drained, still nothing lost; aborted, requests are
    eager = replace(cfg, autoscale=auto.model_copy(update=dict(low_freeness=1, high_freeness=3,
                                                               scale_down_delay_s=1)))
    eager_drained = simulate(workload, eager, COST)
    assert eager_drained.aborted == 0 and len(eager_drained.finished) == len(workload)
    assert eager_drained.migrations > 0                                 # what the removed instances held moved
    aborting = simulate(workload, replace(eager, scale_in="abort", abort_grace_s=0.5), COST)
    assert aborting.aborted > 0 and len(aborting.finished) == len(workload) - aborting.aborted
