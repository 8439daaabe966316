"""The sparse MoE block: router maths per layout against a hand-written reference, and the property expert
parallelism depends on: splitting a layer's experts among owners never changes a bit of the output."""

import dataclasses
import math

import pytest
import torch

from instance.model.experts import LocalExperts, Routing, ShardedExperts, split
from instance.model.moe import MoEArch, SparseMoE, route

HIDDEN = 32

# (name, MoEArch): the four layouts' routing flags; Qwen2-MoE also has its gated shared expert
LAYOUTS = [
    ("mixtral", MoEArch(num_experts=8, top_k=2, expert_ffn=24, norm_topk_prob=True)),
    ("qwen2-moe", MoEArch(num_experts=8, top_k=3, expert_ffn=24, norm_topk_prob=False, shared_ffn=40,
                          shared_gate=True)),
    ("qwen3-moe", MoEArch(num_experts=8, top_k=2, expert_ffn=24, norm_topk_prob=True)),
    ("olmoe", MoEArch(num_experts=8, top_k=2, expert_ffn=24, norm_topk_prob=False)),
]


def reference_route(logits: list[float], k: int, renormalize: bool) -> tuple[list[int], list[float]]:
    """Routing written out for one token with Python floats: softmax, the k largest, optional renormalise."""
    top = max(logits)
    exp = [math.exp(v - top) for v in logits]
    probs = [e / sum(exp) for e in exp]
    ids = sorted(range(len(probs)), key=lambda i: -probs[i])[:k]
    weights = [probs[i] for i in ids]
    if renormalize:
        weights = [w / sum(weights) for w in weights]
    return ids, weights


def reference_block(block: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The block token by token, in float64: sum_k w_k * expert_k(x) (+ sigmoid(g . x) * shared(x))."""
    moe = block.moe
    out = torch.zeros(x.shape[0], HIDDEN, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t:t + 1]
        ids, weights = reference_route(block.gate(xt)[0].tolist(), moe.top_k, moe.norm_topk_prob)
        for e, w in zip(ids, weights):
            out[t] += w * block.experts.expert(e)(xt)[0].double()
        if block.shared_expert is not None:
            gate = torch.sigmoid(block.shared_expert_gate(xt)[0, 0]).double()
            out[t] += gate * block.shared_expert(xt)[0].double()
    return out


def make_block(moe: MoEArch, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    block = SparseMoE(moe, HIDDEN)
    with torch.no_grad():
        block.gate.weight.mul_(20.0)          # routing with clear winners, as real routers have
    return block.eval()


@pytest.mark.parametrize("name, moe", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@torch.inference_mode()
def test_router_matches_the_hand_written_softmax_top_k(name, moe):
    logits = torch.randn(64, moe.num_experts, generator=torch.Generator().manual_seed(1)) * 3
    routing = route(logits, moe.top_k, moe.norm_topk_prob)
    assert routing.weights.dtype == torch.float32
    for t in range(logits.shape[0]):
        ids, weights = reference_route(logits[t].tolist(), moe.top_k, moe.norm_topk_prob)
        assert routing.ids[t].tolist() == ids
        assert routing.weights[t].tolist() == pytest.approx(weights, abs=1e-6)
    sums = routing.weights.sum(-1)
    if moe.norm_topk_prob:
        assert torch.allclose(sums, torch.ones_like(sums))
    else:
        assert (sums < 1).all()


@pytest.mark.parametrize("name, moe", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@torch.inference_mode()
def test_block_matches_the_token_by_token_reference(name, moe):
    block = make_block(moe)
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(2))
    got = block(x)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), reference_block(block, x), atol=2e-6, rtol=1e-5)


def test_routing_groups_list_each_experts_rows_in_batch_order():
    routing = Routing(ids=torch.tensor([[3, 0], [0, 2], [3, 1], [2, 3]]), weights=torch.ones(4, 2), num_experts=5)
    groups = {e: (rows.tolist(), slots.tolist()) for e, (rows, slots) in routing.groups().items()}
    assert groups == {0: ([0, 1], [1, 0]), 1: ([2], [1]), 2: ([1, 3], [1, 0]), 3: ([0, 2, 3], [0, 0, 1])}
    assert list(groups) == [0, 1, 2, 3]


SPLITS = {
    1: [[0, 1, 2, 3, 4, 5, 6, 7]],
    2: [[6, 1, 4, 3], [7, 0, 5, 2]],                       # interleaved, and listed out of order
    3: [[7, 2], [0, 4, 5], [3, 6, 1]],
}


@pytest.mark.parametrize("name, moe", LAYOUTS, ids=[n for n, _ in LAYOUTS])
@pytest.mark.parametrize("top_k", [None, 4])
@pytest.mark.parametrize("owners", [1, 2, 3])
@torch.inference_mode()
def test_splitting_the_experts_among_owners_changes_no_bit(name, moe, top_k, owners):
    # with two terms a float sum is the same in any order; top-4 makes the combine's fixed order matter
    block = make_block(dataclasses.replace(moe, top_k=top_k or moe.top_k))
    x = torch.randn(96, HIDDEN, generator=torch.Generator().manual_seed(3))
    single, single_token = block(x), block(x[:1])          # a batch, and one token (a decode step)
    local = block.experts
    block.experts = split(local, SPLITS[owners])
    try:
        assert torch.equal(block(x), single)
        assert torch.equal(block(x[:1]), single_token)
    finally:
        block.experts = local


def test_a_placement_that_misses_an_expert_is_refused():
    block = make_block(LAYOUTS[0][1])
    with pytest.raises(ValueError, match="exactly once"):
        split(block.experts, [[0, 1, 2], [3, 4, 5, 6]])
    with pytest.raises(ValueError, match="exactly once"):
        split(block.experts, [[0, 1, 2, 3, 4], [4, 5, 6, 7]])
    # an owner that silently skips an expert it was routed to is caught at the combine, not in the tokens
    partial = ShardedExperts([LocalExperts({e: block.experts.expert(e) for e in range(8)})], num_experts=8)
    partial.owners[0]._ids = [0, 1, 2, 3]
    block.experts = partial
    with pytest.raises(RuntimeError, match="exactly once"):
        block(torch.randn(64, HIDDEN))
