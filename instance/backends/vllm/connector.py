"""Tidal's KV connector for vLLM: how a request's KV blocks leave one vLLM engine and enter another, through
vLLM's public KV-connector plug-in point (`kv_transfer_config.kv_connector_module_path` names this module; no
vLLM patch).

vLLM builds one connector per role in the same process (the engine core runs in-process): a SCHEDULER half
that decides which blocks to fill, and a WORKER half that holds the paged KV tensors and copies the bytes. Both
halves and `VllmBackend` meet in a `Shared` record keyed by the backend's `tidal_key` (from
`kv_connector_extra_config`), so the backend reaches the KV tensors without an RPC.

What the two halves do, in vLLM's own calls:

- **Load** (a migrated request arrives; a suspended one resumes). The backend adds the request to vLLM with its
  whole token list as prompt and `kv_transfer_params={"tidal_load": key}`. `get_num_new_matched_tokens`
  answers how many of its tokens the staged KV covers (at most all but the last, which vLLM computes to sample
  the next token); vLLM allocates blocks for the request and tells `update_state_after_alloc` which; the next
  `build_connector_meta` hands the copy to the worker, whose `start_load_kv` writes the KV into those blocks
  before that step's forward pass. The KV comes from a tensor staged by the migration (`Shared.staged`) or,
  for a resume, from the request's own blocks that vLLM still holds (below).
- **Hold** (a request is suspended for its last migration stage). The backend aborts it in vLLM;
  `request_finished` answers True for it, so vLLM keeps its blocks (the connector "owns" them, `Shared.held`).
  They go back when the request leaves (the destination committed, or the client aborted it): the backend
  frees them at once (`internals.free_held_blocks`). After a resume they go once the worker copied them into
  the resumed request's new blocks: `get_finished` then reports the old request in `finished_sending`
  (`Shared.release`), vLLM's own way of taking blocks back from a connector.

Blocks travel as one tensor [layers, A, n, ...]: the per-layer tensors stacked, with the block axis moved to
position 2 (A is the layer tensor's axis before the block axis, or 1 when the block axis comes first).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

LOAD_KEY = "tidal_load"          # kv_transfer_params key naming what to load a request's KV from
EXTRA_KEY = "tidal_key"          # kv_connector_extra_config key naming the backend


@dataclass
class Staged:
    """KV waiting to be loaded into a request's blocks: a tensor (migrated in) or blocks vLLM holds for a
    suspended request (a resume), covering `num_tokens` tokens."""

    num_tokens: int
    blocks: torch.Tensor | None = None
    held_block_ids: list[int] | None = None
    held_vllm_id: str | None = None


@dataclass
class Load:
    vllm_id: str
    key: str
    block_ids: list[int]
    done: bool = False        # the worker may be handed one step's metadata more than once


@dataclass
class TidalMeta(KVConnectorMetadata):
    loads: list[Load] = field(default_factory=list)


@dataclass
class Shared:
    """What the connector's two halves and the backend share (one per backend)."""

    kv_caches: dict[str, torch.Tensor] = field(default_factory=dict)     # worker: layer name -> paged tensor
    block_axis: int = -1
    staged: dict[str, Staged] = field(default_factory=dict)              # load key -> KV to load
    pending: dict[str, Load] = field(default_factory=dict)               # allocated, not yet sent to the worker
    hold: set[str] = field(default_factory=set)      # vLLM ids whose blocks to keep when they finish
    held: dict[str, list[int]] = field(default_factory=dict)             # vLLM id -> its held blocks
    release: set[str] = field(default_factory=set)   # held requests whose blocks vLLM may free now
    # vLLM's own count of tokens it scheduled (computed) per request, from each step's SchedulerOutput
    scheduled_tokens: Counter = field(default_factory=Counter)
    step_tokens: int = 0                              # tokens scheduled by the last step
    loaded_tokens: Counter = field(default_factory=Counter)             # vLLM id -> tokens loaded by us

    # ----- the KV tensors (worker side) ----------------------------------------------------------------------
    def layers(self) -> list[torch.Tensor]:
        if not self.kv_caches:
            raise RuntimeError("vLLM has not registered its KV caches with the Tidal connector")
        return list(self.kv_caches.values())

    def read(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of these blocks from every layer: [layers, A, n, ...]."""
        idx = torch.tensor(block_ids, dtype=torch.long)
        ax = self.block_axis
        stacked = torch.stack([t.index_select(ax, idx) for t in self.layers()])
        return stacked.movedim(ax + 1, 2) if ax != 1 else stacked

    def write(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        if blocks.shape[2] != len(block_ids):
            raise ValueError(f"{blocks.shape[2]} blocks given for {len(block_ids)} block ids")
        layers = self.layers()
        if blocks.shape[0] != len(layers):
            raise ValueError(f"blocks of {blocks.shape[0]} layers for an engine of {len(layers)}")
        idx = torch.tensor(block_ids, dtype=torch.long)
        ax = self.block_axis
        per_layer = blocks.movedim(2, ax + 1) if ax != 1 else blocks
        for t, b in zip(layers, per_layer):
            t.index_copy_(ax, idx, b.to(t.dtype))


_SHARED: dict[str, Shared] = {}


def shared_for(key: str) -> Shared:
    return _SHARED.setdefault(key, Shared())


def forget(key: str) -> None:
    _SHARED.pop(key, None)


class TidalKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig" = None):
        super().__init__(vllm_config, role, kv_cache_config)
        key = vllm_config.kv_transfer_config.get_from_extra_config(EXTRA_KEY, None)
        if key is None:
            raise ValueError(f"TidalKVConnector needs kv_connector_extra_config[{EXTRA_KEY!r}]")
        self.shared = shared_for(key)
        self.num_blocks = kv_cache_config.num_blocks if kv_cache_config is not None else None
        self.block_size = vllm_config.cache_config.block_size

    # ----- scheduler half ------------------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        staged = self._staged_for(request)
        if staged is None:
            return 0, False
        # the last token is always computed here: its logits give the next token
        covered = min(staged.num_tokens, request.num_tokens - 1)
        return max(0, covered - num_computed_tokens), False

    def get_loaded_kv_cache_group_ids(self, request: "Request") -> tuple[int, ...]:
        return tuple(range(len(self._kv_cache_config.kv_cache_groups)))

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int):
        if num_external_tokens <= 0:
            return
        key = request.kv_transfer_params[LOAD_KEY]
        need = -(-(request.num_computed_tokens + num_external_tokens) // self.block_size)
        block_ids = list(blocks.get_block_ids()[0][:need])
        self.shared.pending[request.request_id] = Load(request.request_id, key, block_ids)
        self.shared.loaded_tokens[request.request_id] += num_external_tokens

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = TidalMeta(loads=list(self.shared.pending.values()))
        self.shared.pending.clear()
        self.shared.step_tokens = scheduler_output.total_num_scheduled_tokens
        for rid, n in scheduler_output.num_scheduled_tokens.items():
            self.shared.scheduled_tokens[rid] += n
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        rid = request.request_id
        self.shared.scheduled_tokens.pop(rid, None)
        self.shared.loaded_tokens.pop(rid, None)
        self.shared.pending.pop(rid, None)
        if rid in self.shared.hold:
            self.shared.hold.discard(rid)
            self.shared.held[rid] = list(block_ids)
            return True, None          # vLLM keeps the blocks until get_finished reports rid
        return False, None

    def _staged_for(self, request: "Request") -> Staged | None:
        params = request.kv_transfer_params
        if not params or LOAD_KEY not in params:
            return None
        return self.shared.staged.get(params[LOAD_KEY])

    # ----- worker half ---------------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        shapes = {tuple(t.shape) for t in kv_caches.values()}
        if len(shapes) != 1:
            raise ValueError(f"Tidal's connector needs every layer's KV cache in one shape, got {shapes}")
        shape = next(iter(shapes))
        axes = [i for i, d in enumerate(shape) if d == self.num_blocks]
        if len(axes) != 1:
            raise ValueError(f"cannot tell the block axis of KV caches shaped {shape} ({self.num_blocks} blocks)")
        self.shared.kv_caches = dict(kv_caches)
        self.shared.block_axis = axes[0]
        log.info("Tidal connector: %d KV layers shaped %s, blocks on axis %d", len(kv_caches), shape, axes[0])

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        for load in getattr(meta, "loads", ()):
            if load.done:
                continue
            load.done = True
            staged = self.shared.staged.pop(load.key, None)
            if staged is None:
                raise RuntimeError(f"Tidal connector: nothing staged under {load.key} for {load.vllm_id}")
            if staged.blocks is not None:
                self.shared.write(load.block_ids, staged.blocks[:, :, :len(load.block_ids)])
            else:
                src = staged.held_block_ids[:len(load.block_ids)]
                self.shared.write(load.block_ids, self.shared.read(src))
                self.shared.release.add(staged.held_vllm_id)     # copied: its held blocks may go

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self):
        return

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = {rid for rid in self.shared.release if rid in self.shared.held}
        if not done:
            return None, None
        for rid in done:
            self.shared.release.discard(rid)
            self.shared.held.pop(rid, None)
        return done, None
