"""Issue 18's simulator pieces: the GPU-shaped cost model, de-fragmentation and reservations in a simulated
cluster, and the rate sweep on a tiny grid."""

import pytest

from benchmarks.sim_sweep import configs, knee, regime, run_curve
from orchestrator.policies.migration import MigrationPolicyConfig
from orchestrator.sim.cluster import SimConfig, SimRequest, simulate
from orchestrator.sim.cost_model import (A10_BANDWIDTH_BPS, A10_FP16_FLOPS, KV_BYTES_PER_TOKEN, LLAMA7B_PARAMS,
                                         STEP_OVERHEAD_S, StepCostModel, StepWork, gpu_7b, load_cost_model)

COST = StepCostModel(step_s=0.01, tokens_s=0.001, samples_s=0.0005, decode_attn_s=1e-6, prefill_attn_s=1e-7)


def test_the_gpu_7b_model_is_its_stated_formula():
    m = gpu_7b()
    assert load_cost_model("gpu-7b") == m
    weights_s = 2 * LLAMA7B_PARAMS / A10_BANDWIDTH_BPS                     # 13.4 GB of fp16 read per step
    full = StepWork(tokens=15, samples=15, decode_attn=15 * 1000)          # a full cache: 15 decodes at 1000
    assert m.work_seconds(full) == pytest.approx(
        STEP_OVERHEAD_S + weights_s + 15 * 2 * LLAMA7B_PARAMS / A10_FP16_FLOPS + 15 * m.samples_s
        + 15_000 * KV_BYTES_PER_TOKEN / A10_BANDWIDTH_BPS)
    one = m.work_seconds(StepWork(tokens=1, samples=1, decode_attn=1000))
    assert 0.030 < one < 0.040                                             # ~35 ms: the weights dominate
    assert m.work_seconds(full) < 2 * one                                  # 15 sequences cost < 2x one
    prefill = m.work_seconds(StepWork(tokens=512, samples=1, prefill_attn=512 * 512))
    assert 0.10 < prefill < 0.20                                           # a 512-token chunk ~0.14 s
    with pytest.raises(ValueError, match="cpu, gpu-7b"):
        load_cost_model("tpu")


def fragmenting_workload():
    """Four long generations spread over two 100-block instances (about 62 blocks used on each, freeness ~19,
    below the ordinary destination threshold), then a 56-block prompt that fits on neither."""
    early = [SimRequest(0.0, 640, 300), SimRequest(0.01, 480, 300), SimRequest(0.02, 480, 300),
             SimRequest(0.03, 320, 300)]
    return early + [SimRequest(0.5, 880, 8)]


def run(**policy):
    cfg = SimConfig(num_instances=2, num_blocks=100, max_model_len=1600, migration=MigrationPolicyConfig(**policy))
    res = simulate(fragmenting_workload(), cfg, COST)
    big = next(r for r in res.records if r.request_id == "req-4")
    return big, res


def test_defrag_admits_a_prompt_that_fits_nowhere_long_before_anything_finishes():
    big_without, without = run()
    big_with, with_ = run(defrag=True)
    assert without.migrations == 0                                         # ordinary rebalancing finds no move
    assert with_.migrations >= 1 and with_.migrations_aborted == 0
    first_done = min(r.finish_s for r in with_.records if r.request_id != "req-4")
    assert big_with.first_token_s < first_done                             # room was made, not waited for
    assert big_with.ttft_s < big_without.ttft_s / 2
    assert len(with_.finished) == len(without.finished) == 5


def test_the_sweep_is_deterministic_and_finds_a_knee():
    reg = regime("gpu-7b", 0)
    a = run_curve("zipf", 4, 2.0, [0.2, 0.6, 1.2], reg, 150, seed=0, log=lambda *_: None)
    b = run_curve("zipf", 4, 2.0, [0.2, 0.6, 1.2], reg, 150, seed=0, log=lambda *_: None)
    assert a == b and len(a) == 3 * len(configs(reg, 4, 0))
    at, ratios = knee(a)
    assert at in {p.rate for p in a} and set(ratios) == {"rr", "leastload", "leastload+m"}
    light = min(p.rate for p in a)
    assert all(p.migrations == 0 for p in a if p.policy in ("rr", "leastload"))
    assert any(p.migrations > 0 for p in a if p.policy == "tidal" and p.rate > light)
