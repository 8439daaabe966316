"""The pieces of deterministic mode (instance/model/llama.py's docstring says what it guarantees and why):
products that never see fewer than `min_rows(threads)` rows, and attention over keys in fixed chunks from position 0."""

from __future__ import annotations

import torch
from torch import nn


def min_rows(threads: int) -> int:
    """The fewest rows a matrix product is given in deterministic mode (shorter inputs are padded). Measured on
    torch 2.13's CPU build: with one thread every product of 4 rows or more gives a row the same bits (fewer
    take other kernels); with more threads some counts up to 11 differ, 12 and up agree."""
    return 4 if threads == 1 else 16


KV_CHUNK = 64          # deterministic mode: attention reduces over keys in chunks of this many, from position 0


class Linear(nn.Linear):
    """nn.Linear that, with `min_rows` set, never runs a product on fewer rows (see deterministic mode)."""

    min_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(padded_rows(x, self.min_rows))[:x.shape[0]]


def padded_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` [n, ...] with zero rows appended up to `rows`."""
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, masked to `allowed`) v over keys in KV_CHUNK-sized chunks from position 0.

    q [..., m, d] (m >= min_rows), k and v [..., L, d] with L a multiple of KV_CHUNK, `allowed` broadcastable
    to [..., m, L]. Every product has the shape (m, d) x (d, KV_CHUNK) or (m, KV_CHUNK) x (KV_CHUNK, d), and the
    chunks are added in ascending order, so keys a row may not see add exact zeros."""
    length = k.shape[-2]
    kt = k.transpose(-1, -2)
    scores = torch.cat([torch.matmul(q, kt[..., c:c + KV_CHUNK]) for c in range(0, length, KV_CHUNK)], dim=-1)
    probs = torch.softmax((scores * scale).masked_fill_(~allowed, float("-inf")), dim=-1)
    out = torch.matmul(probs[..., :KV_CHUNK].contiguous(), v[..., :KV_CHUNK, :])
    for c in range(KV_CHUNK, length, KV_CHUNK):
        out += torch.matmul(probs[..., c:c + KV_CHUNK].contiguous(), v[..., c:c + KV_CHUNK, :])
    return out


def chunk_multiple(n: int) -> int:
    return -(-n // KV_CHUNK) * KV_CHUNK


def padded_keys(x: torch.Tensor, length: int) -> torch.Tensor:
    """Keys or values [..., L, kvh, d] cut or zero-padded to `length` along L."""
    have = x.shape[-3]
    if have >= length:
        return x[..., :length, :, :]
    return torch.cat([x, x.new_zeros(*x.shape[:-3], length - have, *x.shape[-2:])], dim=-3)
