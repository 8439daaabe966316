"""Sparse upcycling: serve a dense model as an MoE.

Every layer's dense MLP becomes `num_experts` experts that start as exact copies of it (Komatsuzaki et al.,
"Sparse Upcycling", ICLR 2023), behind a new seeded random router; attention, norms and embeddings are kept.
The top-k weights are renormalised, so they sum to one: with top-1 the single weight is exactly 1.0 and a
layer computes the dense MLP's output for every token (on each expert's share of the batch, so it equals the
dense model bit for bit when the matrix products do, and up to their batch-size rounding otherwise). This is
how a real model with real text exercises the MoE path: routing, dispatch and combine.

The experts share the dense MLP's tensors rather than holding copies: they are equal by construction, and
sharing keeps memory at the dense model's. An expert that later moves to another owner is copied then.
"""

from __future__ import annotations

import dataclasses

import torch

from instance.model.experts import LocalExperts
from instance.model.llama import LlamaModel
from instance.model.moe import MoEArch, SparseMoE


def upcycle(model: LlamaModel, num_experts: int, top_k: int, seed: int) -> None:
    """Turn a dense model into an MoE in place (see the module docstring)."""
    arch = model.arch
    if arch.moe is not None:
        raise ValueError("upcycle_experts: the model is already a Mixture of Experts; upcycle a dense model")
    moe = MoEArch(num_experts=num_experts, top_k=top_k, expert_ffn=arch.intermediate_size, norm_topk_prob=True)
    gen = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        dense = layer.mlp
        weight = dense.down_proj.weight
        router = torch.randn(num_experts, arch.hidden_size, generator=gen) / arch.hidden_size ** 0.5
        block = SparseMoE(moe, arch.hidden_size, experts=LocalExperts({e: dense for e in range(num_experts)}))
        block.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            block.gate.weight.copy_(router)
        layer.mlp = block
    model.arch = dataclasses.replace(arch, moe=moe)
