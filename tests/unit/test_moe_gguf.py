"""GGUF MoE files written with the gguf package's GGUFWriter load back with the weights that were written,
for each architecture's names and keys, and serve on the engine."""

import numpy as np
import pytest
import torch

from instance.config import EngineConfig
from instance.engine import Engine
from instance.model.llama import LlamaModel
from instance.model.loader import load_model
from instance.model.moe import SparseMoE
from instance.model.moe_checkpoint import UnsupportedLayoutError, fuse_expert_tensors
from instance.sampling import SamplingParams
from instance.tokenizer import bytes_to_unicode

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, LAYERS, EXPERTS, TOP_K, FFN, SHARED_FFN = 64, 4, 2, 3, 6, 2, 40, 56
VOCAB = 257                                  # 256 byte tokens and one end-of-text token


def head_dim(arch: str) -> int:
    return 24 if arch == "qwen3moe" else HIDDEN // HEADS          # qwen3moe: head_dim != hidden / heads


def hf_weights(arch: str, dense_layers=(), seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in Hugging Face names, experts stacked per projection ([E, F, H] / [E, H, F])."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    d = head_dim(arch)
    w = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN), "model.norm.weight": 1 + 0.1 * rand(HIDDEN),
         "lm_head.weight": rand(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rand(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rand(HIDDEN)
        for n, rows in (("q", HEADS * d), ("k", KV_HEADS * d), ("v", KV_HEADS * d)):
            w[p + f"self_attn.{n}_proj.weight"] = rand(rows, HIDDEN)
            if arch == "qwen2moe":
                w[p + f"self_attn.{n}_proj.bias"] = 0.1 * rand(rows)
        w[p + "self_attn.o_proj.weight"] = rand(HIDDEN, HEADS * d)
        if arch == "qwen3moe":
            w[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rand(d)
            w[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rand(d)
        if arch == "olmoe":
            w[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rand(HEADS * d)
            w[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rand(KV_HEADS * d)
        if i in dense_layers:
            w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = rand(FFN, HIDDEN), rand(FFN, HIDDEN)
            w[p + "mlp.down_proj.weight"] = rand(HIDDEN, FFN)
            continue
        w[p + "mlp.gate.weight"] = 6 * rand(EXPERTS, HIDDEN)
        w[p + "mlp.experts.gate_proj"] = rand(EXPERTS, FFN, HIDDEN)
        w[p + "mlp.experts.up_proj"] = rand(EXPERTS, FFN, HIDDEN)
        w[p + "mlp.experts.down_proj"] = rand(EXPERTS, HIDDEN, FFN)
        if arch == "qwen2moe":
            s = p + "mlp.shared_expert."
            w[s + "gate_proj.weight"], w[s + "up_proj.weight"] = rand(SHARED_FFN, HIDDEN), rand(SHARED_FFN, HIDDEN)
            w[s + "down_proj.weight"] = rand(HIDDEN, SHARED_FFN)
            w[p + "mlp.shared_expert_gate.weight"] = rand(1, HIDDEN)
    return w


GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight", "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight", "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    **{f"self_attn.{n}_proj.{kind}": f"attn_{n}.{kind}" for n in "qkv" for kind in ("weight", "bias")},
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to llama-arch q/k rows (interleave each head's two rotary halves)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(path, arch: str, weights: dict[str, torch.Tensor], per_expert: bool = False, **keys) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_key_length(head_dim(arch))
    writer.add_value_length(head_dim(arch))
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_expert_count(EXPERTS)
    writer.add_expert_used_count(TOP_K)
    writer.add_expert_feed_forward_length(FFN)
    if arch == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(SHARED_FFN)
    for key, value in keys.items():
        getattr(writer, f"add_{key}")(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*bytes_to_unicode().values(), "<|endoftext|>"])
    writer.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL])
    writer.add_eos_token_id(256)
    for name, w in weights.items():
        if name in TOP_NAMES:
            writer.add_tensor(TOP_NAMES[name], w.numpy())
            continue
        _, _, layer, rest = name.split(".", 3)
        if arch == "llama" and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            w = llama_cpp_permute(w, HEADS if "q_proj" in rest else KV_HEADS)
        if rest == "mlp.shared_expert_gate.weight":
            w = w.reshape(-1)                                   # llama.cpp's shape: {n_embd}
        if per_expert and rest.startswith("mlp.experts."):      # old Mixtral files: one tensor per expert
            proj = rest.split(".")[2].removesuffix("_proj")
            for e in range(EXPERTS):
                writer.add_tensor(f"blk.{layer}.ffn_{proj}.{e}.weight", np.ascontiguousarray(w[e].numpy()))
            continue
        writer.add_tensor(f"blk.{layer}.{GGUF_NAMES[rest]}", np.ascontiguousarray(w.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


CASES = {
    # name: (architecture, per-expert tensors, dense layers, extra keys)
    "mixtral": ("llama", False, (), {}),
    "mixtral-per-expert": ("llama", True, (), {}),
    "qwen2moe": ("qwen2moe", False, (1,), {}),
    "qwen3moe": ("qwen3moe", False, (), {}),
    "olmoe": ("olmoe", False, (), {}),
}
NORM_TOPK = {"llama": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}   # llama.cpp's defaults


@pytest.mark.parametrize("case", list(CASES))
@torch.inference_mode()
def test_a_written_moe_gguf_loads_back_with_the_weights_written(case, tmp_path):
    arch, per_expert, dense, keys = CASES[case]
    written = hf_weights(arch, dense_layers=dense)
    path = tmp_path / f"{case}.gguf"
    write_gguf(path, arch, {k: v.clone() for k, v in written.items()}, per_expert=per_expert, **keys)

    loaded = load_model(EngineConfig(model=str(path), max_model_len=256)).model
    moe = loaded.arch.moe
    assert (moe.num_experts, moe.top_k, moe.expert_ffn) == (EXPERTS, TOP_K, FFN)
    assert moe.norm_topk_prob == NORM_TOPK[arch]
    assert (moe.shared_ffn, moe.shared_gate) == ((SHARED_FFN, True) if arch == "qwen2moe" else (0, False))
    assert moe.dense_layers == dense
    assert loaded.arch.qk_norm == {"qwen3moe": "head", "olmoe": "full"}.get(arch)
    assert loaded.arch.head_dim == head_dim(arch)
    assert [isinstance(layer.mlp, SparseMoE) for layer in loaded.layers] == [i not in dense for i in range(LAYERS)]

    # the MoE tensors, read straight off the modules against what was written
    for i, layer in enumerate(loaded.layers):
        p = f"model.layers.{i}."
        attn = layer.self_attn
        if attn.qk_norm is not None:
            assert torch.equal(attn.q_norm.weight, written[p + "self_attn.q_norm.weight"])
            assert torch.equal(attn.k_norm.weight, written[p + "self_attn.k_norm.weight"])
        if i in dense:
            continue
        block = layer.mlp
        assert torch.equal(block.gate.weight, written[p + "mlp.gate.weight"])
        for e in range(EXPERTS):
            expert = block.experts.expert(e)
            gate, up = expert.gate_up_proj.weight.split(FFN)
            assert torch.equal(gate, written[p + "mlp.experts.gate_proj"][e])
            assert torch.equal(up, written[p + "mlp.experts.up_proj"][e])
            assert torch.equal(expert.down_proj.weight, written[p + "mlp.experts.down_proj"][e])
        if arch == "qwen2moe":
            s = p + "mlp.shared_expert."
            gate, up = block.shared_expert.gate_up_proj.weight.split(SHARED_FFN)
            assert torch.equal(gate, written[s + "gate_proj.weight"]) and torch.equal(up, written[s + "up_proj.weight"])
            assert torch.equal(block.shared_expert.down_proj.weight, written[s + "down_proj.weight"])
            assert torch.equal(block.shared_expert_gate.weight, written[p + "mlp.shared_expert_gate.weight"])
    # and every tensor (attention too, q/k rows un-permuted for llama) equals a model loaded from the HF names
    expected = LlamaModel(loaded.arch, max_positions=8)
    expected.load_hf_weights(fuse_expert_tensors(dict(written)))
    want, got = expected.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_moe_gguf_serves_and_its_keys_override_the_defaults(tmp_path):
    path = tmp_path / "qwen2moe-norm.gguf"
    write_gguf(path, "qwen2moe", hf_weights("qwen2moe", seed=1), expert_weights_norm=True)
    engine = Engine(model=str(path), num_blocks=64, block_size=8, max_model_len=128)
    assert engine.arch.moe.norm_topk_prob is True
    outs = engine.generate(["hello", "MoE"], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert [len(o.new_token_ids) for o in outs] == [6, 6]
    assert engine.generate(["hello"], SamplingParams(max_tokens=6, temperature=0.0,
                                                     ignore_eos=True))[0].new_token_ids == outs[0].new_token_ids


def test_an_unsupported_routing_function_is_refused_with_a_sentence(tmp_path):
    path = tmp_path / "sigmoid.gguf"
    write_gguf(path, "qwen3moe", hf_weights("qwen3moe"), expert_gating_func=gguf.ExpertGatingFuncType.SIGMOID)
    with pytest.raises(UnsupportedLayoutError, match="only softmax routing"):
        load_model(EngineConfig(model=str(path), max_model_len=256))
