"""Prefix-aware dispatch: requests that share a prefix go to the instance holding it until the queue there
costs more than the prefill it saves; the frontend's index follows the digests; the simulator runs the same
policy over its own prefix caches."""

import random
from collections import Counter
from dataclasses import replace

import pytest

from instance.backend import LoadSnapshot
from instance.kv_cache import block_hashes, blocks_for
from orchestrator.policies.dispatch import Candidate, choose_instance
from orchestrator.policies.prefix import PrefixIndex, prefix_cost
from orchestrator.sim.cluster import SimConfig, SimRequest, simulate
from orchestrator.sim.cost_model import StepCostModel

BS = 16


def load(free=1000, waiting=0, demand=0, running=0, digest=()) -> LoadSnapshot:
    return LoadSnapshot(total_blocks=1000, free_blocks=free, used_blocks=1000 - free, reserved_blocks=0,
                        block_size=BS, num_running=running, num_waiting=waiting, num_preempted=0, num_suspended=0,
                        head_demand_blocks=demand, waiting_demand_blocks=demand, running_tokens=0,
                        step_time_ms=0.0, tokens_per_s=0.0, num_preemptions_total=0, cached_prefixes=tuple(digest))


def dispatch_burst(n: int, prompt: int, cached: dict[str, int], weight: float = 1.0) -> list[str]:
    """A frontend sending n requests on one snapshot: each adds its uncached prefill to where it went."""
    pending = Counter()
    picks = []
    rng = random.Random(0)
    for _ in range(n):
        cs = [Candidate(i, load(), pending_requests=sum(1 for p in picks if p == i), cached_blocks=cached[i],
                        pending_blocks=sum(blocks_for(prompt + 1, BS) for p in picks if p == i),
                        pending_prefill_tokens=pending[i]) for i in sorted(cached)]
        iid = choose_instance("prefix-aware", cs, 0, rng, prompt_tokens=prompt, prefix_weight=weight)
        pending[iid] += prompt - round(weight * cached[iid] * BS)     # as the frontend records it
        picks.append(iid)
    return picks


def test_a_shared_prefix_goes_where_it_is_cached_until_the_queue_there_outweighs_the_saving():
    # 1024-token prompts of which "hot" caches 60 blocks (960 tokens): each one queued there costs 64 tokens
    picks = dispatch_burst(40, 1024, {"hot": 60, "cold-a": 0, "cold-b": 0})
    first_cold = picks.index(next(p for p in picks if p != "hot"))
    assert picks[:first_cold] == ["hot"] * first_cold
    assert first_cold == 15                     # 64 + 15 x 64 = 1024 tokens: the cost of a cold prefill
    assert picks.count("hot") > 25 and picks.count("cold-a") >= 1 and picks.count("cold-b") >= 1


def test_the_weight_sets_how_much_a_cached_token_is_worth():
    assert dispatch_burst(10, 1024, {"hot": 60, "cold": 0}, weight=0.0).count("hot") == 5   # load only
    assert dispatch_burst(10, 1024, {"hot": 60, "cold": 0}, weight=1.0).count("hot") == 10
    with pytest.raises(ValueError, match="dispatch_prefix_weight"):
        dispatch_burst(1, 64, {"a": 0}, weight=-1)


def test_a_queue_or_a_memory_shortage_on_the_holder_outweighs_its_prefix():
    hot = Candidate("hot", load(waiting=3, demand=200), cached_blocks=60)   # 3200 queued tokens
    cold = Candidate("cold", load())
    assert choose_instance("prefix-aware", [hot, cold], 0, random.Random(0), prompt_tokens=1024) == "cold"
    full = Candidate("full", load(free=2), cached_blocks=60)                # needs 5 blocks, has 2 free
    assert prefix_cost(full, 1024, 1.0) == 64 + 3 * BS
    assert choose_instance("prefix-aware", [full, cold], 0, random.Random(0), prompt_tokens=1024) == "full"


def test_a_holder_busy_prefilling_another_prompt_counts_that_prefill_as_queue():
    busy = Candidate("busy", replace(load(running=1), prefill_backlog_tokens=2000), cached_blocks=60)
    idle = Candidate("idle", load())
    assert prefix_cost(busy, 1024, 1.0) == 64 + 2000
    assert choose_instance("prefix-aware", [busy, idle], 0, random.Random(0), prompt_tokens=1024) == "idle"
    nearly_done = Candidate("busy", replace(load(running=1), prefill_backlog_tokens=100), cached_blocks=60)
    assert choose_instance("prefix-aware", [nearly_done, idle], 0, random.Random(0), prompt_tokens=1024) == "busy"


def test_the_index_counts_leading_blocks_of_the_digest_and_follows_new_digests():
    prompt = list(range(100))
    hs = block_hashes(prompt, BS, "m")                                      # 6 full blocks
    index = PrefixIndex()
    index.update("a", load(digest=hs[:4]))
    index.update("b", load(digest=hs[1:]))                                 # lost its first block: no prefix
    assert index.cached_blocks("a", hs) == 4 and index.cached_blocks("b", hs) == 0
    index.update("a", load(digest=hs))
    assert index.cached_blocks("a", hs) == 6 and index.cached_blocks("unknown", hs) == 0
    index.retain(["b"])
    assert index.cached_blocks("a", hs) == 0


def test_the_simulator_sends_shared_prefixes_to_their_instance_and_computes_less():
    rng = random.Random(5)
    systems = [tuple(rng.randrange(1 << 20) for _ in range(384)) for _ in range(4)]
    work = []
    for i in range(160):
        sys_ = systems[i % 4]
        own = tuple(rng.randrange(1 << 20) for _ in range(rng.randint(16, 96)))
        work.append(SimRequest(arrival_s=i * 0.02, prompt_tokens=len(sys_) + len(own), output_tokens=8,
                               token_ids=sys_ + own))
    cost = StepCostModel(step_s=0.002, tokens_s=0.0002, samples_s=0.0001, decode_attn_s=1e-7, prefill_attn_s=1e-8)
    base = dict(num_instances=4, num_blocks=400, block_size=BS, max_model_len=1024, migrate=False)
    results = {name: simulate(work, SimConfig(**base, **cfg), cost) for name, cfg in {
        "rr-nocache": dict(dispatch="round-robin"),
        "leastload-cache": dict(dispatch="least-load", prefix_caching=True),
        "prefix-aware": dict(dispatch="prefix-aware", prefix_caching=True)}.items()}
    assert all(len(r.finished) == 160 for r in results.values())
    assert results["rr-nocache"].prefix_query_tokens == 0
    aware, least = results["prefix-aware"], results["leastload-cache"]
    assert aware.prefix_hit_rate > least.prefix_hit_rate > 0
    assert aware.computed_tokens < least.computed_tokens < results["rr-nocache"].computed_tokens
