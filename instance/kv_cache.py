"""The paged KV cache: a block pool of integers, and the tensor that holds the blocks.

`BlockPool` never touches tensors: it hands out block ids in two phases (`can_allocate`, then `allocate`),
keeps blocks reserved for incoming migrations apart from blocks in use, and checks that
free + used + reserved == total.

Prefix caching: a full block whose keys and values are computed can be *cached* under the hash of its
tokens (`block_hashes`: a chain, so a block's hash names its whole prefix, seeded with the model). Cached
blocks are shared by reference count (`acquire`); when the last holder frees one it stays cached and
*evictable*: it counts as free (`num_free`, what admission and the load report see) and is reused,
least-recently-used first, only once the never-cached free blocks have run out (`num_cached` says how many
of the free blocks still hold a prefix).

`KVCacheTensors` holds every layer's keys and values in one tensor of shape
[layers, 2, num_blocks, block_size, kv_heads, head_dim], so a run of blocks exports as one contiguous tensor.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens: the one rounding every part of Tidal uses."""
    return -(-num_tokens // block_size)


def block_hashes(token_ids: list[int], block_size: int, seed: str, start: int = 0,
                 parent: int | None = None) -> list[int]:
    """Hashes of the full blocks of `token_ids` from block `start` on (`parent`: the hash of block start-1).
    Each hash covers its block's tokens and its parent's hash, so equal hashes mean equal prefixes; `seed`
    (the model's name) keeps two models' caches apart. Deterministic across processes (not Python's hash()),
    so instances and frontends agree on them: 63-bit unsigned integers."""
    if parent is None:
        parent = _seed_hash(seed) if start == 0 else None
    if parent is None:
        raise ValueError("block_hashes: a start past block 0 needs the parent's hash")
    out = []
    for b in range(start, len(token_ids) // block_size):
        block = token_ids[b * block_size:(b + 1) * block_size]
        data = struct.pack(f"<Q{len(block)}q", parent, *block)
        parent = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1
        out.append(parent)
    return out


def _seed_hash(seed: str) -> int:
    return int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest(), "little") >> 1


class OutOfBlocksError(RuntimeError):
    """Asked for more blocks than are free. Callers check `can_allocate` first; this means a logic error."""


class BlockPool:
    def __init__(self, num_blocks: int, caching: bool = False):
        """`caching`: keep full computed blocks under their hash for later requests (prefix caching)."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.caching = caching
        self._free: deque[int] = deque(range(num_blocks))     # free and holding no prefix
        self._ref_count = [0] * num_blocks
        self._reserved: set[int] = set()
        self._num_used = 0
        self._hash_of: dict[int, int] = {}                     # cached block -> its hash
        self._block_of: dict[int, int] = {}                    # hash -> cached block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, no holder; least recently used first
        self._recent: OrderedDict[int, None] = OrderedDict()   # hashes of cached blocks, most recently used last
        self.num_evicted = 0

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: never-cached free blocks and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a cached prefix (evicted only when the other free blocks ran out)."""
        return len(self._evictable)

    @property
    def num_cached_total(self) -> int:
        """Blocks cached under a hash, with holders or without."""
        return len(self._hash_of)

    @property
    def num_used(self) -> int:
        return self._num_used

    @property
    def num_reserved(self) -> int:
        return len(self._reserved)

    def ref_count(self, block_id: int) -> int:
        return self._ref_count[block_id]

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def hash_of(self, block_id: int) -> int | None:
        return self._hash_of.get(block_id)

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks into use."""
        ids = self._take(n)
        for b in ids:
            self._ref_count[b] = 1
        self._num_used += n
        return ids

    def free(self, block_ids: list[int]) -> None:
        """Give blocks in use back (a block returns to the pool when its last holder frees it). A cached block
        stays cached and becomes evictable; pass a request's blocks in order and its tail is evicted first."""
        for b in reversed(block_ids):
            if self._ref_count[b] <= 0:
                raise ValueError(f"block {b} freed but it is not in use")
            self._ref_count[b] -= 1
            if self._ref_count[b] == 0:
                self._num_used -= 1
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)

    # ----- prefix caching ------------------------------------------------------------------------------------
    def cached_prefix(self, hashes: list[int]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` (block hashes in order); takes nothing."""
        out = []
        if self.caching:
            for h in hashes:
                b = self._block_of.get(h)
                if b is None:
                    break
                out.append(b)
        return out

    def num_to_take(self, block_ids: list[int]) -> int:
        """How many free blocks acquiring these cached blocks uses up (the evictable ones among them)."""
        return sum(1 for b in block_ids if self._ref_count[b] == 0)

    def acquire(self, block_ids: list[int]) -> None:
        """Hold cached blocks (one more reference each); an evictable one goes back into use."""
        for b in block_ids:
            if b not in self._hash_of:
                raise ValueError(f"block {b} is not cached")
            if self._ref_count[b] == 0:
                del self._evictable[b]
                self._num_used += 1
            self._ref_count[b] += 1
            self._recent.move_to_end(self._hash_of[b])

    def cache(self, block_id: int, block_hash: int) -> bool:
        """Cache a full block in use whose KV is computed. False (and nothing changes) if caching is off,
        another block already holds this hash, or the block is cached already."""
        if not self.caching or block_hash in self._block_of or block_id in self._hash_of:
            return False
        if self._ref_count[block_id] <= 0:
            raise ValueError(f"block {block_id} cached but it is not in use")
        self._hash_of[block_id] = block_hash
        self._block_of[block_hash] = block_id
        self._recent[block_hash] = None
        return True

    def digest(self, limit: int) -> tuple[int, ...]:
        """Up to `limit` hashes of cached blocks, most recently used first: what dispatch needs to know where
        prefixes live, bounded."""
        out = []
        for h in reversed(self._recent):
            if len(out) >= limit:
                break
            out.append(h)
        return tuple(out)

    # ----- migrations ----------------------------------------------------------------------------------------
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
        evictable = set(self._evictable)
        used = {b for b, c in enumerate(self._ref_count) if c > 0}
        problems = []
        if len(free) != len(self._free):
            problems.append("a block is on the free list twice")
        parts = (free, evictable, used, self._reserved)
        if sum(len(p) for p in parts) != len(set().union(*parts)):
            problems.append("a block is in two of free / evictable / used / reserved")
        if len(used) != self._num_used:
            problems.append(f"used count {self._num_used} != blocks with holders {len(used)}")
        if sum(len(p) for p in parts) != self.num_blocks:
            problems.append(f"free {len(free)} + evictable {len(evictable)} + used {len(used)} + reserved "
                            f"{len(self._reserved)} != total {self.num_blocks}")
        cached = set(self._hash_of)
        if not evictable <= cached:
            problems.append("an evictable block is not cached")
        if cached & (free | self._reserved):
            problems.append("a cached block is on the free list or reserved")
        if len(self._block_of) != len(self._hash_of) or any(self._block_of.get(h) != b
                                                            for b, h in self._hash_of.items()):
            problems.append("the hash -> block and block -> hash maps disagree")
        if set(self._recent) != set(self._block_of):
            problems.append("the recency list and the cached hashes disagree")
        if problems:
            raise AssertionError("block pool broken: " + "; ".join(problems))

    def _take(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} free")
        ids = [self._free.popleft() for _ in range(min(n, len(self._free)))]
        while len(ids) < n:                      # the never-cached ones ran out: evict, least recently used first
            b, _ = self._evictable.popitem(last=False)
            h = self._hash_of.pop(b)
            del self._block_of[h]
            del self._recent[h]
            self.num_evicted += 1
            ids.append(b)
        return ids

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
