"""The paged KV cache: a block pool of integers, and the tensor that holds the blocks.

`BlockPool` never touches tensors: it hands out block ids in two phases (`can_allocate`, then `allocate`),
keeps blocks reserved for incoming migrations apart from blocks in use, and checks that
free + used + reserved == total. Ref counts are kept per block so that prefix sharing can be added later.

`KVCacheTensors` holds every layer's keys and values in one tensor of shape
[layers, 2, num_blocks, block_size, kv_heads, head_dim], so a run of blocks exports as one contiguous tensor.
"""

from __future__ import annotations

from collections import deque

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens: the one rounding every part of Tidal uses."""
    return -(-num_tokens // block_size)


class OutOfBlocksError(RuntimeError):
    """Asked for more blocks than are free. Callers check `can_allocate` first; this means a logic error."""


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_count = [0] * num_blocks
        self._reserved: set[int] = set()
        self._num_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks into use."""
        ids = self._take(n)
        for b in ids:
            self._ref_count[b] = 1
        self._num_used += n
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Give blocks in use back (a block returns to the pool when its last holder frees it)."""
        for b in block_ids:
            if self._ref_count[b] <= 0:
                raise ValueError(f"block {b} freed but it is not in use")
            self._ref_count[b] -= 1
            if self._ref_count[b] == 0:
                self._num_used -= 1
                self._free.append(b)

    def reserve(self, n: int) -> list[int]:
        """Set n free blocks aside for data that is about to arrive (a migration stage)."""
        ids = self._take(n)
        self._reserved.update(ids)
        return ids

    def commit_reserved(self, block_ids: list[int]) -> None:
        """Reserved blocks become blocks in use, held by the request that now owns them."""
        self._check_reserved(block_ids)
        for b in block_ids:
            self._reserved.discard(b)
            self._ref_count[b] = 1
        self._num_used += len(block_ids)

    def release_reserved(self, block_ids: list[int]) -> None:
        """Give reserved blocks back to the free pool (a migration was aborted)."""
        self._check_reserved(block_ids)
        for b in block_ids:
            self._reserved.discard(b)
            self._free.append(b)

    def is_reserved(self, block_id: int) -> bool:
        return block_id in self._reserved

    def check_integrity(self) -> None:
        free = set(self._free)
        used = {b for b, c in enumerate(self._ref_count) if c > 0}
        problems = []
        if len(free) != len(self._free):
            problems.append("a block is on the free list twice")
        if free & used or free & self._reserved or used & self._reserved:
            problems.append("a block is in two of free / used / reserved")
        if len(used) != self._num_used:
            problems.append(f"used count {self._num_used} != blocks with holders {len(used)}")
        if len(free) + len(used) + len(self._reserved) != self.num_blocks:
            problems.append(
                f"free {len(free)} + used {len(used)} + reserved {len(self._reserved)} != total {self.num_blocks}")
        if problems:
            raise AssertionError("block pool broken: " + "; ".join(problems))

    def _take(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise OutOfBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def _check_reserved(self, block_ids: list[int]) -> None:
        missing = [b for b in block_ids if b not in self._reserved]
        if missing:
            raise ValueError(f"blocks {missing[:8]} are not reserved")


class KVCacheTensors:
    """Keys and values of every layer, block-addressed."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.block_size = block_size
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[i, 0], self.data[i, 1]

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A contiguous copy of the given blocks: [layers, 2, len(block_ids), block_size, kv_heads, head_dim]."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        return self.data.index_select(2, index)

    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        expected = (*self.data.shape[:2], len(block_ids), *self.data.shape[3:])
        if tuple(blocks.shape) != expected:
            raise ValueError(f"imported KV blocks have shape {tuple(blocks.shape)}, this cache expects {expected}")
        index = torch.tensor(block_ids, dtype=torch.long, device=self.data.device)
        self.data.index_copy_(2, index, blocks.to(device=self.data.device, dtype=self.data.dtype))
