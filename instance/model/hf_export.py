"""Write a GGUF model out as a Hugging Face safetensors directory (config.json, model.safetensors, tokenizer
files), once, into a cache; engines that cannot read GGUF (vLLM on CPU) load that directory.

The weights are our loader's own dequantisation of the GGUF (float32), so both backends serve the same numbers.
Dense Llama-family models only (what `gguf_hf_weights` reads as llama / mistral / qwen2 / qwen3 without
experts).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from instance.model.loader import ModelNotFoundError, gguf_hf_weights, resolve_model

log = logging.getLogger(__name__)

CACHE_DIR = Path.home() / ".cache" / "tidal" / "hf"
_FORMAT = 1          # bump when what is written changes, so old cache entries are not reused
_HF_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
             "qwen3": "Qwen3ForCausalLM"}


def hf_dir_for(model: str, cache_dir: Path = CACHE_DIR) -> Path:
    """A directory Hugging Face loaders (and vLLM) read for `model`: the model's own directory if it is one,
    else one written from its GGUF file into `cache_dir` (the first call writes it, later calls reuse it)."""
    kind, path = resolve_model(model)
    if kind == "hf":
        return path
    if kind != "gguf":
        raise ModelNotFoundError(f"model: {model!r} has seeded random weights and no files; the vLLM backend "
                                 "needs real weights (smollm2-135m, a .gguf file or a Hugging Face directory)")
    stat = path.stat()
    out = cache_dir / f"{path.stem}-{stat.st_size}-v{_FORMAT}"
    if (out / "config.json").is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{path.stem}-"))
    try:
        write_hf_dir(path, tmp)
        try:
            os.rename(tmp, out)                      # atomic: a concurrent writer's copy wins, ours is dropped
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote a Hugging Face copy of %s to %s", path.name, out)
    return out


def write_hf_dir(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file

    from instance.gguf_meta import read_gguf_metadata
    import gguf

    arch, weights, tokenizer = gguf_hf_weights(gguf_path)
    kind = read_gguf_metadata(gguf.GGUFReader(str(gguf_path))).get("general.architecture")
    if arch.moe is not None or kind not in _HF_TYPES:
        raise ModelNotFoundError(f"model: {gguf_path} ({kind}{', MoE' if arch.moe else ''}) cannot be written as a "
                                 f"Hugging Face directory; supported: dense {', '.join(_HF_TYPES)}")
    if arch.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    config = {
        "architectures": [_HF_TYPES[kind]], "model_type": kind, "torch_dtype": "float32",
        "vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads, "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim, "hidden_act": "silu", "rms_norm_eps": arch.rms_norm_eps,
        "rope_theta": arch.rope_theta, "rope_scaling": arch.rope_scaling,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings, "attention_bias": arch.attention_bias,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": list(tokenizer.eos_token_ids)}, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    backend = getattr(tokenizer, "_backend", None)
    if backend is None:
        raise ModelNotFoundError(f"model: the tokenizer of {gguf_path} has no Hugging Face form to write")
    backend.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer._bos_token,
        "eos_token": tokenizer._eos_token, "add_bos_token": tokenizer.add_bos,
        "chat_template": tokenizer.chat_template, "model_max_length": arch.max_position_embeddings}, indent=2))
