"""Upcycling: SmolLM2-135M served as an MoE (its MLP copied into experts behind a seeded router) gives the dense
model's greedy text with top-1, while its tokens really are routed across the experts."""

import pytest
import torch

from instance.engine import Engine
from instance.model.moe import SparseMoE
from instance.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SMOLLM2 = dict(num_blocks=256, max_model_len=512)


@pytest.fixture(scope="module")
def dense() -> Engine:
    return Engine(model="smollm2-135m", **SMOLLM2)


@pytest.fixture(scope="module")
def moe() -> Engine:
    return Engine(model="smollm2-135m-moe", **SMOLLM2)


def recording_logits(engine: Engine) -> list[torch.Tensor]:
    steps: list[torch.Tensor] = []
    logits = type(engine.runner.model).logits
    engine.runner.model.logits = lambda hidden: steps.append(logits(engine.runner.model, hidden)) or steps[-1]
    return steps


def test_smollm2_moe_is_smollm2_with_four_experts_per_layer(moe, dense):
    assert (moe.arch.moe.num_experts, moe.arch.moe.top_k, moe.arch.moe.norm_topk_prob) == (4, 1, True)
    assert all(isinstance(layer.mlp, SparseMoE) for layer in moe.runner.model.layers)
    assert dense.arch.moe is None and moe.arch.num_layers == dense.arch.num_layers == 30
    # the experts share the dense MLP's tensors: no extra memory for identical copies
    dense_numel = sum(p.numel() for p in dense.runner.model.parameters())
    moe_numel = sum(p.numel() for p in moe.runner.model.parameters())
    assert moe_numel - dense_numel == 30 * 4 * dense.arch.hidden_size          # only the routers are new


def test_top1_upcycled_greedy_text_equals_the_dense_models(moe, dense):
    ours = [o.new_token_ids for o in moe.generate(PROMPTS, GREEDY)]
    assert ours == [o.new_token_ids for o in dense.generate(PROMPTS, GREEDY)]
    assert "Paris" in moe.tokenizer.decode(ours[0])


def test_top1_upcycled_logits_equal_the_dense_models_bit_for_bit_one_token_at_a_time(moe, dense):
    """With one token per step every expert's matrix product is the dense one on the same row, and the single
    routing weight is exactly 1.0: the logits are identical, not just close."""
    prompt = moe.tokenizer.encode("The")[:1]
    ours, theirs = recording_logits(moe), recording_logits(dense)
    try:
        assert moe.generate([prompt], GREEDY)[0].new_token_ids == dense.generate([prompt], GREEDY)[0].new_token_ids
        assert len(ours) == len(theirs) == GREEDY.max_tokens
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    finally:
        del moe.runner.model.logits, dense.runner.model.logits


def test_real_text_is_routed_across_all_experts(moe):
    load = torch.zeros(4)

    def count(block, inputs, _output):
        load.add_(torch.bincount(block.route(inputs[0]).ids.flatten(), minlength=4).float())

    hooks = [layer.mlp.register_forward_hook(count) for layer in moe.runner.model.layers]
    try:
        moe.generate(PROMPTS[:2], SamplingParams(max_tokens=1, temperature=0.0))
    finally:
        for h in hooks:
            h.remove()
    assert load.min() > 0.1 * load.sum()


def test_upcycling_is_a_setting_for_any_dense_model():
    cfg = dict(num_blocks=128, block_size=4, max_model_len=256)
    dense = Engine(model="tiny-llama", **cfg)
    top1 = Engine(model="tiny-llama", upcycle_experts=3, **cfg)
    top2 = Engine(model="tiny-llama", upcycle_experts=3, upcycle_top_k=2, **cfg)
    assert (top2.arch.moe.num_experts, top2.arch.moe.top_k) == (3, 2)
    prompts = [[5, 6, 7, 8], list(range(30, 70))]
    want = [o.new_token_ids for o in dense.generate(prompts, GREEDY)]
    assert [o.new_token_ids for o in top1.generate(prompts, GREEDY)] == want
    assert [o.new_token_ids for o in top2.generate(prompts, GREEDY)] == want     # weights sum to 1 (rounding)
    with pytest.raises(ValueError, match="already a Mixture of Experts"):
        Engine(model="tiny-moe", upcycle_experts=2, **cfg)
