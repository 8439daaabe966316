"""MoE checkpoints: the layout (MoEArch, q/k norm) of GGUF and Hugging Face MoE files, and their expert
tensors brought into one naming.

The model loads experts from Hugging Face's fused layout, per layer `mlp.gate.weight` [E, H],
`mlp.experts.gate_up_proj` [E, 2F, H] (gate rows first) and `mlp.experts.down_proj` [E, H, F]; that is what
transformers >= 5 holds in memory. `fuse_expert_tensors` builds it from the other layouts found on disk:

- per expert, `mlp.experts.{e}.{gate,up,down}_proj.weight` (Qwen2-MoE, Qwen3-MoE, OLMoE safetensors) or
  `block_sparse_moe.experts.{e}.w1/w3/w2.weight` with `block_sparse_moe.gate.weight` (Mixtral safetensors,
  old Mixtral GGUFs' `ffn_gate.{e}` tensors once renamed);
- stacked per projection, `mlp.experts.{gate,up,down}_proj` [E, F, H] / [E, H, F] (GGUF `ffn_*_exps`).

Layouts covered (softmax routing in all; top-k renormalisation as each reference implementation does it):
Mixtral (renormalised), Qwen2-MoE (`norm_topk_prob`, default off; shared expert with a sigmoid gate;
`decoder_sparse_step` / `mlp_only_layers`), Qwen3-MoE (`norm_topk_prob`; q/k RMSNorm per head), OLMoE
(`norm_topk_prob`, default off; q/k RMSNorm over the whole projection).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from instance.model.moe import MoEArch


class UnsupportedLayoutError(ValueError):
    """The checkpoint's MoE variant is one this engine does not compute."""


# ----- Hugging Face config.json -------------------------------------------------------------------------------

HF_MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def hf_qk_norm(cfg: dict) -> str | None:
    kind = cfg.get("model_type")
    if kind in ("qwen3", "qwen3_moe"):
        return "head"
    if kind == "olmoe":
        return "full"
    return None


def hf_moe_arch(cfg: dict) -> MoEArch | None:
    """The MoE layout a Hugging Face config.json describes; None for a dense model."""
    kind = cfg.get("model_type")
    if kind not in HF_MOE_TYPES:
        return None
    if kind == "olmoe" and cfg.get("clip_qkv") is not None:
        raise UnsupportedLayoutError("model: OLMoE with clip_qkv is not supported; use a checkpoint without it")
    if kind == "olmoe" and cfg.get("attention_bias"):
        raise UnsupportedLayoutError("model: OLMoE with attention_bias (an o_proj bias) is not supported")
    # checkpoints say num_experts (Qwen, OLMoE) or num_local_experts (Mixtral; transformers 5 saves Qwen3-MoE so)
    num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
    if kind == "mixtral":
        return MoEArch(num_experts=num_experts, top_k=cfg["num_experts_per_tok"],
                       expert_ffn=cfg["intermediate_size"], norm_topk_prob=True)
    if kind == "olmoe":
        return MoEArch(num_experts=num_experts, top_k=cfg["num_experts_per_tok"],
                       expert_ffn=cfg["intermediate_size"], norm_topk_prob=cfg.get("norm_topk_prob", False))
    layers = cfg["num_hidden_layers"]
    step = cfg.get("decoder_sparse_step") or 1
    mlp_only = set(cfg.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(layers) if i in mlp_only or (i + 1) % step != 0)
    shared = cfg.get("shared_expert_intermediate_size", 0) if kind == "qwen2_moe" else 0
    return MoEArch(num_experts=num_experts, top_k=cfg["num_experts_per_tok"],
                   expert_ffn=cfg["moe_intermediate_size"], norm_topk_prob=cfg.get("norm_topk_prob", False),
                   shared_ffn=shared, shared_gate=bool(shared), dense_layers=dense)


# ----- GGUF metadata -------------------------------------------------------------------------------------------

GGUF_MOE_ARCHS = ("qwen2moe", "qwen3moe", "olmoe")
# llama.cpp's choice per architecture when the file has no {arch}.expert_weights_norm key
_GGUF_DEFAULT_NORM = {"llama": True, "mistral": True, "qwen2moe": False, "qwen3moe": True, "olmoe": False}
_GGUF_SOFTMAX = 1


def gguf_qk_norm(shapes: dict[str, tuple[int, ...]], head_dim: int) -> str | None:
    """q/k RMSNorm from the tensors: a [head_dim] weight is per head, a longer one covers the projection."""
    shape = shapes.get("blk.0.attn_q_norm.weight")
    if shape is None:
        return None
    return "head" if shape[-1] == head_dim else "full"


def gguf_moe_arch(kind: str, meta: Callable, shapes: dict[str, tuple[int, ...]], num_layers: int) -> MoEArch | None:
    """The MoE layout of a GGUF file; None for a dense one. `meta(key, default)` reads `{kind}.{key}`;
    `shapes` maps tensor names to numpy shapes. Sizes come from the tensors, so a missing length key is no
    problem; a layer without a router (`ffn_gate_inp`) is dense."""
    count = meta("expert_count", 0)
    if not count:
        if kind in GGUF_MOE_ARCHS:
            raise UnsupportedLayoutError(f"model: the {kind} GGUF has no {kind}.expert_count key")
        return None
    gating = meta("expert_gating_func", _GGUF_SOFTMAX)
    if int(gating) != _GGUF_SOFTMAX:
        raise UnsupportedLayoutError(f"model: the GGUF routes with gating function {gating} (2 = sigmoid); "
                                     f"only softmax routing (1) is supported")
    scale = float(meta("expert_weights_scale", 1.0))
    if scale not in (0.0, 1.0):
        raise UnsupportedLayoutError(f"model: the GGUF scales expert weights by {scale}; only 1.0 is supported")
    moe_layers = [i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" in shapes]
    if not moe_layers:
        raise UnsupportedLayoutError("model: the GGUF declares experts but no layer has a router (ffn_gate_inp)")
    first = moe_layers[0]
    down = shapes.get(f"blk.{first}.ffn_down_exps.weight") or shapes.get(f"blk.{first}.ffn_down.0.weight")
    if down is None:
        raise UnsupportedLayoutError(f"model: layer {first} has a router but no expert tensors (ffn_down_exps)")
    shared = shapes.get(f"blk.{first}.ffn_down_shexp.weight")
    return MoEArch(
        num_experts=int(count),
        top_k=int(meta("expert_used_count")),
        expert_ffn=down[-1],
        norm_topk_prob=bool(meta("expert_weights_norm", _GGUF_DEFAULT_NORM.get(kind, True))),
        shared_ffn=shared[-1] if shared else 0,
        shared_gate=f"blk.{first}.ffn_gate_inp_shexp.weight" in shapes,
        dense_layers=tuple(i for i in range(num_layers) if i not in moe_layers),
    )


# GGUF tensor (after `blk.{i}.`) -> Hugging Face name (after `model.layers.{i}.`)
GGUF_MOE_LAYER_NAMES = {
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_GGUF_PER_EXPERT = re.compile(r"ffn_(gate|up|down)\.(\d+)\.weight")


def gguf_moe_layer_name(rest: str) -> str | None:
    """The Hugging Face name of a per-layer GGUF MoE tensor, or None if `rest` is not one."""
    if rest in GGUF_MOE_LAYER_NAMES:
        return GGUF_MOE_LAYER_NAMES[rest]
    m = _GGUF_PER_EXPERT.fullmatch(rest)
    if m:
        return f"mlp.experts.{m.group(2)}.{m.group(1)}_proj.weight"
    return None


# ----- expert tensors into the fused layout --------------------------------------------------------------------

_MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_PER_EXPERT = re.compile(r"(model\.layers\.\d+\.)(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_STACKED = re.compile(r"(model\.layers\.\d+\.)mlp\.experts\.(gate_proj|up_proj|down_proj)")


def fuse_expert_tensors(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite per-expert and stacked expert tensors into the fused layout, in place; returns the dict."""
    for name in [n for n in weights if ".block_sparse_moe.gate." in n]:
        weights[name.replace(".block_sparse_moe.", ".mlp.")] = weights.pop(name)
    per_layer: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for name in list(weights):
        m = _PER_EXPERT.fullmatch(name)
        if m:
            prefix, expert, proj = m.group(1), int(m.group(2)), _MIXTRAL_NAMES.get(m.group(3), m.group(3))
            per_layer.setdefault(prefix, {}).setdefault(proj, {})[expert] = weights.pop(name)
    for prefix, projections in per_layer.items():
        for proj, experts in projections.items():
            if sorted(experts) != list(range(len(experts))):
                raise ValueError(f"the checkpoint's {prefix}experts {proj} tensors skip experts: {sorted(experts)}")
            weights[f"{prefix}mlp.experts.{proj}"] = torch.stack([experts[e] for e in range(len(experts))])
    for name in list(weights):
        m = _STACKED.fullmatch(name)
        if m and m.group(2) == "gate_proj":
            prefix = m.group(1) + "mlp.experts."
            if prefix + "up_proj" not in weights:
                raise ValueError(f"the checkpoint has {name} but no {prefix}up_proj")
            weights[prefix + "gate_up_proj"] = torch.cat([weights.pop(name), weights.pop(prefix + "up_proj")], dim=1)
    return weights
