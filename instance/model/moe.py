"""The sparse Mixture-of-Experts feed-forward block of the Llama-family decoder.

    logits = x W_gate^T                         [T, E]
    probs  = softmax(logits) in float32
    w, ids = top-k of probs                     [T, k]
    w      = w / sum(w)                         if norm_topk_prob (Mixtral, Qwen3-MoE; not Qwen2-MoE, OLMoE)
    y      = sum over the k experts, in ascending expert id, of w * SwiGLU_e(x)      (float32)
    y     += sigmoid(x w_shared_gate) * SwiGLU_shared(x)                            (Qwen2-MoE's shared expert)

The block computes the routing itself and hands (x, routing) to its `experts` (see experts.py), the seam an
expert-parallel dispatcher replaces. The shared expert and the router stay with the block: they are dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from instance.model.experts import Experts, LocalExperts, Routing, SwiGLU, combine


@dataclass(frozen=True)
class MoEArch:
    """What makes a decoder's feed-forward layers sparse. Dense models have none (ModelArch.moe is None)."""

    num_experts: int
    top_k: int
    expert_ffn: int                      # intermediate size of one routed expert
    norm_topk_prob: bool = True          # renormalise the top-k weights to sum to 1
    shared_ffn: int = 0                  # intermediate size of the shared expert; 0 = no shared expert
    shared_gate: bool = False            # the shared expert's output is scaled by sigmoid(x . w) (Qwen2-MoE)
    dense_layers: tuple[int, ...] = ()   # layers that keep a dense MLP (Qwen's mlp_only_layers, sparse_step)

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe: top_k must be between 1 and the number of experts ({self.num_experts}), "
                             f"not {self.top_k}")
        if self.expert_ffn < 1:
            raise ValueError(f"moe: the experts' intermediate size must be positive, not {self.expert_ffn}")
        if self.shared_gate and not self.shared_ffn:
            raise ValueError("moe: a shared-expert gate needs a shared expert (shared_ffn > 0)")


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """softmax over all experts in float32, the top k, then optionally renormalised to sum to one."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(ids, weights, num_experts=logits.shape[-1])


class SparseMoE(nn.Module):
    """Router, routed experts behind the `Experts` seam, optional (gated) shared expert.

    Parameter names follow Hugging Face's Qwen2-MoE: `gate` is the router, `shared_expert`,
    `shared_expert_gate`.
    """

    def __init__(self, moe: MoEArch, hidden_size: int, experts: Experts | None = None):
        super().__init__()
        self.moe = moe
        self.hidden_size = hidden_size
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        if experts is None:
            experts = LocalExperts({e: SwiGLU(hidden_size, moe.expert_ffn) for e in range(moe.num_experts)})
        self.experts = experts
        self.shared_expert = SwiGLU(hidden_size, moe.shared_ffn) if moe.shared_ffn else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if moe.shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        y = combine(routing, self.experts(x, routing), self.hidden_size)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared.float()
        return y.to(x.dtype)

    def route(self, x: torch.Tensor) -> Routing:
        return route(self.gate(x), self.moe.top_k, self.moe.norm_topk_prob)

    def load_hf_weights(self, take: Callable[[str], torch.Tensor], prefix: str) -> None:
        """Copy this block's tensors out of a checkpoint in Hugging Face's fused layout (see moe_checkpoint.py):
        `{prefix}gate.weight` [E, H], `{prefix}experts.gate_up_proj` [E, 2F, H] (gate rows first),
        `{prefix}experts.down_proj` [E, H, F], and the shared expert's `shared_expert.*` tensors."""
        if not isinstance(self.experts, LocalExperts):
            raise RuntimeError("moe: weights are loaded before the experts are placed on other owners")
        self.gate.weight.copy_(take(prefix + "gate.weight"))
        gate_up, down = take(prefix + "experts.gate_up_proj"), take(prefix + "experts.down_proj")
        for e in self.experts.owned():
            expert = self.experts.expert(e)
            expert.gate_up_proj.weight.copy_(gate_up[e])
            expert.down_proj.weight.copy_(down[e])
        if self.shared_expert is not None:
            s = prefix + "shared_expert."
            self.shared_expert.gate_up_proj.weight.copy_(
                torch.cat([take(s + "gate_proj.weight"), take(s + "up_proj.weight")]))
            self.shared_expert.down_proj.weight.copy_(take(s + "down_proj.weight"))
        if self.shared_expert_gate is not None:
            self.shared_expert_gate.weight.copy_(take(prefix + "shared_expert_gate.weight").reshape(1, -1))
