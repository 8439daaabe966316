"""Each MoE layout against transformers' own implementation: a small random Mixtral, Qwen2-MoE, Qwen3-MoE and
OLMoE (and dense Qwen3 for its q/k norm) saved with save_pretrained, loaded by our HF-directory loader, served
by the engine (paged KV, prefill then decode); every step's logits must match transformers' on the same
sequence, and the greedy tokens must be the same."""

import json

import pytest
import torch

from instance.engine import Engine
from instance.model.moe import SparseMoE
from instance.sampling import SamplingParams
from instance.tokenizer import bytes_to_unicode

transformers = pytest.importorskip("transformers")

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
LAYOUTS = {
    "mixtral": lambda: transformers.MixtralConfig(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                                                  sliding_window=None, **COMMON),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=80, num_experts=8,
        num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1], **COMMON),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                                                     num_experts_per_tok=2, head_dim=32, norm_topk_prob=True, **COMMON),
    "olmoe": lambda: transformers.OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, **COMMON),
    "qwen3": lambda: transformers.Qwen3Config(intermediate_size=96, head_dim=32, **COMMON),
}
PROMPTS = [[5, 17, 200, 33, 90, 1, 64], list(range(40, 80, 3)), [250, 3] * 12]
NEW_TOKENS = 8
# measured: 3e-6 to 8e-6 at logits of magnitude ~4 (a dense Llama with the same init differs by as much:
# rotary tables and attention rounding, not the MoE block, which agrees with transformers' to 1e-6)
LOGIT_TOLERANCE = 5e-5


def randomise(model, seed: int) -> None:
    """Weights that spread the logits (clear greedy winners) and routers that spread the experts' logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise * ((6.0 if name.endswith("mlp.gate.weight") else 1.0) / p.shape[-1] ** 0.5))
            elif "norm" in name:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)


def write_byte_tokenizer(directory) -> None:
    """A byte-level tokenizer.json with one token per byte, enough for the loader (prompts are token ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({}))


@pytest.fixture(scope="module", params=list(LAYOUTS))
def pair(request, tmp_path_factory):
    """(name, transformers model, our engine on the same weights saved to disk)."""
    name = request.param
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(
        LAYOUTS[name](), dtype=torch.float32, experts_implementation="eager").eval()
    randomise(reference, seed=1)
    directory = tmp_path_factory.mktemp(name)
    reference.save_pretrained(directory)
    write_byte_tokenizer(directory)
    engine = Engine(model=str(directory), num_blocks=64, block_size=8, max_model_len=128)
    return name, reference, engine


def test_the_loader_reads_the_layout(pair):
    name, reference, engine = pair
    cfg, arch = reference.config, engine.arch
    assert arch.qk_norm == {"qwen3_moe": "head", "qwen3": "head", "olmoe": "full"}.get(name)
    if name == "qwen3":
        assert arch.moe is None
        return
    moe = arch.moe
    assert (moe.num_experts, moe.top_k) == (8, cfg.num_experts_per_tok)
    assert moe.norm_topk_prob == {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False}[name]
    assert (moe.shared_ffn, moe.shared_gate) == ((80, True) if name == "qwen2_moe" else (0, False))
    kinds = [type(layer.mlp) is SparseMoE for layer in engine.runner.model.layers]
    assert kinds == ([True, False, True] if name == "qwen2_moe" else [True, True, True])


def test_served_logits_and_greedy_tokens_match_transformers(pair):
    name, reference, engine = pair
    steps: list[torch.Tensor] = []
    logits = engine.runner.model.logits
    engine.runner.model.logits = lambda hidden: steps.append(logits(hidden)) or steps[-1]
    try:
        for prompt in PROMPTS:
            steps.clear()
            out = engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0,
                                                           ignore_eos=True))[0].new_token_ids
            ours = torch.cat(steps)                                            # one row per step
            with torch.inference_mode():
                theirs = reference(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]
            diff = (ours - theirs).abs().max().item()
            assert diff < LOGIT_TOLERANCE, f"{name}: logits differ by {diff}"
            assert theirs.argmax(-1).tolist() == out
    finally:
        engine.runner.model.logits = logits


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
@torch.inference_mode()
def test_one_moe_block_matches_transformers_eager_block(name):
    """The block alone, on the same input: routing, experts, combine and shared expert agree to rounding."""
    from instance.model.moe_checkpoint import fuse_expert_tensors, hf_moe_arch

    torch.manual_seed(0)
    config = LAYOUTS[name]()
    reference = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                              experts_implementation="eager").eval()
    randomise(reference, seed=2)
    cfg = {**config.to_dict(), "model_type": name}
    ours = SparseMoE(hf_moe_arch(cfg), COMMON["hidden_size"])
    weights = {k: v for k, v in reference.state_dict().items() if k.startswith("model.layers.0.mlp.")}
    fuse_expert_tensors(weights)
    ours.load_hf_weights(lambda key: weights.pop(key), "model.layers.0.mlp.")
    assert not weights
    x = torch.randn(50, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(x), reference.model.layers[0].mlp(x[None])[0], atol=1e-6, rtol=1e-6)
