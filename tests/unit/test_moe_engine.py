"""tiny-moe on the native engine: it serves unchanged (paged KV, batching, chunked prefill, preemption), its
routing has clear winners, and splitting every layer's experts among owners changes no logit bit."""

import random

import pytest
import torch
from pydantic import ValidationError

from instance.engine import Engine
from instance.model.experts import LocalExperts, split
from instance.model.moe import SparseMoE
from instance.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=7, ignore_eos=True)


def tiny_moe(**kw) -> Engine:
    cfg = dict(model="tiny-moe", num_blocks=256, block_size=4, max_model_len=256, max_num_batched_tokens=64)
    cfg.update(kw)
    return Engine(**cfg)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return tiny_moe()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 50) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def tokens(outs) -> list[list[int]]:
    return [o.new_token_ids for o in outs]


def moe_blocks(engine: Engine) -> list[SparseMoE]:
    return list(engine.runner.model.moe_blocks().values())


def test_tiny_moe_is_a_four_layer_mixtral_style_model(engine):
    arch = engine.arch
    assert arch.num_layers == 4 and arch.hidden_size == 64
    assert (arch.moe.num_experts, arch.moe.top_k, arch.moe.norm_topk_prob) == (8, 2, True)
    assert list(engine.runner.model.moe_blocks()) == [0, 1, 2, 3]
    dense = Engine(model="tiny-llama", num_blocks=64, max_model_len=128)
    assert dense.arch.moe is None and dense.runner.model.moe_blocks() == {}


def test_batched_chunked_and_preempted_generation_give_each_requests_own_tokens(engine):
    ps = prompts(8)
    alone = [engine.generate([p], GREEDY)[0].new_token_ids for p in ps]
    assert tokens(engine.generate(ps, GREEDY)) == alone
    assert tokens(tiny_moe(max_num_batched_tokens=7).generate(ps, GREEDY)) == alone
    small = tiny_moe(num_blocks=60, max_model_len=128)
    assert tokens(small.generate(ps, GREEDY)) == alone
    assert small.load().num_preemptions_total > 0
    engine.check_integrity()
    assert engine.load().free_blocks == engine.load().total_blocks


def test_seeded_sampling_repeats(engine):
    ps = prompts(3, seed=4)
    assert tokens(engine.generate(ps, SEEDED)) == tokens(engine.generate(ps, SEEDED))


def test_routing_has_clear_winners_and_uses_every_expert(engine):
    """The router is drawn wide (logits of standard deviation ~6): the gap between the k-th and (k+1)-th
    expert's logit is large for nearly every token, next to the ~4e-5 by which batching moves a layer-4 logit.
    (A continuous router always has some near-ties; what placement must not do, change the inputs of the
    routing, is what the split test below checks bit for bit.)"""
    gaps, load = [], torch.zeros(8)

    def record(block, inputs, _output):
        logits = block.gate(inputs[0]).topk(block.moe.top_k + 1, dim=-1).values
        gaps.append(logits[:, -2] - logits[:, -1])
        load.add_(torch.bincount(block.route(inputs[0]).ids.flatten(), minlength=8).float())

    hooks = [b.register_forward_hook(record) for b in moe_blocks(engine)]
    try:
        engine.generate(prompts(8, seed=5), GREEDY)
    finally:
        for h in hooks:
            h.remove()
    gaps = torch.cat(gaps)
    assert gaps.median() > 0.5
    assert (gaps < 1e-3).float().mean() < 0.005
    assert load.min() > 0.5 * load.mean()


@pytest.mark.parametrize("owners", [1, 2, 3])
def test_splitting_every_layers_experts_among_owners_changes_no_logit_bit(owners):
    groups = {1: [list(range(8))], 2: [[0, 2, 4, 6], [7, 5, 3, 1]], 3: [[5, 0], [1, 6, 3], [7, 2, 4]]}[owners]
    # the same prompts run twice and their steps are compared logit for logit: without prefix caching, or the
    # second run would find its prompts cached and run fewer, shorter steps
    engine = tiny_moe(prefix_caching=False)
    seen: list[torch.Tensor] = []
    logits = engine.runner.model.logits
    engine.runner.model.logits = lambda hidden: seen.append(logits(hidden)) or seen[-1]
    ps = prompts(6, seed=6)
    single = tokens(engine.generate(ps, GREEDY))
    reference, seen[:] = list(seen), []
    local = [b.experts for b in moe_blocks(engine)]
    for block in moe_blocks(engine):
        block.experts = split(block.experts, groups)
    assert tokens(engine.generate(ps, GREEDY)) == single
    assert len(seen) == len(reference) and all(torch.equal(a, b) for a, b in zip(seen, reference))
    assert all(isinstance(e, LocalExperts) for e in local)


def test_tiny_moe_settings_shape_the_model():
    engine = tiny_moe(tiny_num_experts=4, tiny_top_k=1, tiny_num_layers=2)
    assert (engine.arch.num_layers, engine.arch.moe.num_experts, engine.arch.moe.top_k) == (2, 4, 1)
    assert len(engine.generate(prompts(2), GREEDY)[0].new_token_ids) == GREEDY.max_tokens
    with pytest.raises(ValidationError, match="tiny_top_k"):
        tiny_moe(tiny_num_experts=2, tiny_top_k=3)
