"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM; and the MoE layouts of Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE) that reads and writes a paged KV cache.

RMSNorm, rotary embeddings (theta and linear / llama3 scaling), grouped-query attention, SwiGLU, tied or
untied embeddings, optional q/k/v bias (Qwen2), optional q/k RMSNorm per head (Qwen3) or over the whole
projection (OLMoE), and a sparse MoE block in place of the MLP (moe.py). Tokens of all requests in a step are
flattened into one [T, hidden] batch for the dense layers; attention runs per group: all decode tokens
together, each prefill chunk on its own.

Deterministic mode (`LlamaModel.set_deterministic`): a row's result depends only on its own inputs, never on
which rows share its batch, how its prompt was chunked, or whether it was prefilled or decoded. Measured on
torch's CPU build (tests/unit/test_determinism.py keeps it so): BLAS takes another kernel for products with
fewer than 4 rows (fewer than 12 on two threads), so no product here sees fewer than that (shorter inputs
are padded; `exact.min_rows`); pointwise ops and row reductions are row-local already; and attention is our own
(`_exact_attention`): keys read from the cache after the new ones are written, scores and the weighted sum of
values computed in chunks of KV_CHUNK keys counted from position 0 with fixed-shape products, so keys past a
row's position contribute exact zeros and a decode row meets the same float operations as the same row in a
prefill chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from instance.model.exact import (Linear, chunk_multiple, chunked_attention, padded_keys,
                                  min_rows, padded_rows)
from instance.model.experts import SwiGLU
from instance.model.moe import MoEArch, SparseMoE


@dataclass(frozen=True)
class ModelArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: Literal["head", "full"] | None = None   # RMSNorm of q and k: per head (Qwen3), whole (OLMoE)
    moe: MoEArch | None = None                       # sparse feed-forward layers; None = a dense model

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers


@dataclass
class PrefillChunk:
    start: int                      # first row of the chunk in the flattened batch
    num_tokens: int                 # query tokens
    context_len: int                # tokens in the cache after this chunk (previous + new)
    block_table: torch.Tensor       # [blocks] long


@dataclass
class AttentionBatch:
    """How the flattened tokens of one step map onto the KV cache. Decode rows come first."""

    slot_mapping: torch.Tensor                 # [T] long: block * block_size + offset, where each token's KV goes
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None   # [B, max_blocks] long
    decode_mask: torch.Tensor | None = None           # [B, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillChunk] = field(default_factory=list)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = arch.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("default", None, "none"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


def rope_tables(arch: ModelArch, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, [max_positions, head_dim], float32."""
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64), rope_inv_freq(arch))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        self.qkv_proj = Linear(arch.hidden_size, q + 2 * kv, bias=arch.attention_bias)
        self.o_proj = Linear(q, arch.hidden_size, bias=False)
        self.exact = False                                # deterministic mode: _exact_attention
        self.min_rows = 0
        self.scale = arch.head_dim ** -0.5
        self.qk_norm = arch.qk_norm
        if arch.qk_norm is not None:
            q_dim, k_dim = (arch.head_dim, arch.head_dim) if arch.qk_norm == "head" else (q, kv)
            self.q_norm = RMSNorm(q_dim, arch.rms_norm_eps)
            self.k_norm = RMSNorm(k_dim, arch.rms_norm_eps)

    def forward(self, x, cos, sin, kv_cache: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch):
        t = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([h * d, kvh * d, kvh * d], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(t, h, d)
        k = k.view(t, kvh, d)
        v = v.view(t, kvh, d)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]

        k_cache, v_cache = kv_cache                      # [blocks, block_size, kvh, d]
        k_cache.view(-1, kvh, d).index_copy_(0, batch.slot_mapping, k)
        v_cache.view(-1, kvh, d).index_copy_(0, batch.slot_mapping, v)

        out = torch.empty(t, h, d, dtype=x.dtype, device=x.device)
        if self.exact:
            self._exact_attention(q, k_cache, v_cache, out, batch)
            return self.o_proj(out.view(t, h * d))
        nd = batch.num_decodes
        if nd:
            flat = batch.decode_block_tables.view(-1)      # index_select: several times faster than k_cache[tables]
            kd = k_cache.index_select(0, flat).view(nd, -1, kvh, d).transpose(1, 2)
            vd = v_cache.index_select(0, flat).view(nd, -1, kvh, d).transpose(1, 2)
            od = F.scaled_dot_product_attention(q[:nd].unsqueeze(2), kd, vd, attn_mask=batch.decode_mask,
                                                scale=self.scale, enable_gqa=True)
            out[:nd] = od.squeeze(2)
        for p in batch.prefills:
            rows = slice(p.start, p.start + p.num_tokens)
            qp = q[rows].transpose(0, 1).unsqueeze(0)                      # [1, h, n, d]
            if p.context_len == p.num_tokens:                              # no earlier context: use k, v as is
                kp = k[rows].transpose(0, 1).unsqueeze(0)
                vp = v[rows].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=self.scale,
                                                    enable_gqa=True)
            else:
                kp = k_cache.index_select(0, p.block_table).view(-1, kvh, d)[:p.context_len].transpose(0, 1)[None]
                vp = v_cache.index_select(0, p.block_table).view(-1, kvh, d)[:p.context_len].transpose(0, 1)[None]
                first = p.context_len - p.num_tokens
                qpos = torch.arange(first, p.context_len, device=x.device)[:, None]
                kpos = torch.arange(p.context_len, device=x.device)[None, :]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=kpos <= qpos, scale=self.scale,
                                                    enable_gqa=True)
            out[rows] = op.squeeze(0).transpose(0, 1)
        return self.o_proj(out.view(t, h * d))


    def _exact_attention(self, q, k_cache, v_cache, out, batch: AttentionBatch) -> None:
        """Attention whose result for a row is the same in any batch, chunking, prefill or decode."""
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        g = h // kvh
        nd = batch.num_decodes
        if nd:
            flat = batch.decode_block_tables.view(-1)
            length = chunk_multiple(batch.decode_block_tables.shape[1] * k_cache.shape[1])
            kd = padded_keys(k_cache.index_select(0, flat).view(nd, -1, kvh, d), length).permute(0, 2, 1, 3)
            vd = padded_keys(v_cache.index_select(0, flat).view(nd, -1, kvh, d), length).permute(0, 2, 1, 3)
            allowed = batch.decode_mask.view(nd, 1, 1, -1)
            allowed = torch.cat([allowed, allowed.new_zeros(nd, 1, 1, length - allowed.shape[-1])], -1)
            qd = padded_rows(q[:nd].view(nd, kvh, g, d).permute(2, 0, 1, 3), max(g, self.min_rows))   # [m, nd, kvh, d]
            od = chunked_attention(qd.permute(1, 2, 0, 3), kd, vd, allowed, self.scale)           # [nd, kvh, m, d]
            out[:nd] = od[:, :, :g].reshape(nd, h, d)
        for p in batch.prefills:
            n, first = p.num_tokens, p.context_len - p.num_tokens
            length = chunk_multiple(p.context_len)
            kp = padded_keys(k_cache.index_select(0, p.block_table).view(-1, kvh, d), length).transpose(0, 1)
            vp = padded_keys(v_cache.index_select(0, p.block_table).view(-1, kvh, d), length).transpose(0, 1)
            rows = q[p.start:p.start + n].view(n, kvh, g, d).permute(0, 2, 1, 3)                  # [n, g, kvh, d]
            qp = padded_rows(rows.reshape(n * g, kvh, d), self.min_rows).transpose(0, 1)            # [kvh, m, d]
            pos = torch.arange(first, first + n, device=q.device).repeat_interleave(g)
            pos = torch.cat([pos, pos.new_full((qp.shape[1] - pos.shape[0],), -1)])
            allowed = torch.arange(length, device=q.device)[None, :] <= pos[:, None]                # [m, length]
            op = chunked_attention(qp, kp, vp, allowed, self.scale)                                # [kvh, m, d]
            out[p.start:p.start + n] = op[:, :n * g].view(kvh, n, g, d).permute(1, 0, 2, 3).reshape(n, h, d)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        if arch.is_moe_layer(index):
            self.mlp = SparseMoE(arch.moe, arch.hidden_size)
        else:
            self.mlp = SwiGLU(arch.hidden_size, arch.intermediate_size)

    def forward(self, x, cos, sin, kv_cache, batch):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)
        cos, sin = rope_tables(arch, max_positions)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids, positions, kv_caches, batch: AttentionBatch) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]."""
        x = self.embed_tokens(input_ids)
        cos = self.rope_cos[positions].to(x.dtype)
        sin = self.rope_sin[positions].to(x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, batch)
        return self.norm(x)

    def set_deterministic(self, on: bool) -> None:
        """Deterministic mode (module docstring): padded products and our own chunked attention."""
        rows = min_rows(torch.get_num_threads()) if on else 0
        for m in self.modules():
            if isinstance(m, (Linear, Attention)):
                m.min_rows = rows
            if isinstance(m, Attention):
                m.exact = on

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def moe_blocks(self) -> dict[int, SparseMoE]:
        """layer index -> its sparse MoE block (where expert placement is set); empty for a dense model."""
        return {i: layer.mlp for i, layer in enumerate(self.layers) if isinstance(layer.mlp, SparseMoE)}

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named Llama weights (q/k/v and gate/up are fused here). Consumes the dict.

        MoE layers take Hugging Face's fused expert layout (`mlp.experts.gate_up_proj` [E, 2F, H], ...);
        moe_checkpoint.fuse_expert_tensors brings per-expert checkpoints and GGUF files into it."""
        dtype = self.embed_tokens.weight.dtype

        def take(name):
            if name not in weights:
                raise ValueError(f"the checkpoint has no tensor {name!r}")
            return weights.pop(name).to(dtype)

        with torch.no_grad():
            self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
            self.norm.weight.copy_(take("model.norm.weight"))
            if self.arch.tie_word_embeddings or "lm_head.weight" not in weights:
                self.lm_head.weight = self.embed_tokens.weight
            else:
                self.lm_head.weight.copy_(take("lm_head.weight"))
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                a = layer.self_attn
                a.qkv_proj.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if self.arch.attention_bias:
                    a.qkv_proj.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                a.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
                if a.qk_norm is not None:
                    a.q_norm.weight.copy_(take(p + "self_attn.q_norm.weight"))
                    a.k_norm.weight.copy_(take(p + "self_attn.k_norm.weight"))
                if isinstance(layer.mlp, SparseMoE):
                    layer.mlp.load_hf_weights(take, p + "mlp.")
                else:
                    layer.mlp.gate_up_proj.weight.copy_(
                        torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
                    layer.mlp.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
                layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
        weights.pop("lm_head.weight", None)
        leftover = [k for k in weights if "rotary_emb" not in k]
        if leftover:
            raise ValueError(f"the checkpoint has tensors this model does not use: {leftover[:5]}")
