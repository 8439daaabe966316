"""The per-layer data path of expert parallelism: send each MoE layer's routed rows to the ranks that own
their experts, compute the leader's own share meanwhile, and hand every expert's output back to the layer's
combine step (experts added in ascending id, in float32: see instance/model/experts.py).

Transport: one Ray actor call per (layer, remote rank that got rows) per step, numpy payloads through Ray's
object store; the leader waits with a deadline. Why placement never changes a token: a remote rank computes
the same module on the same rows (same shapes, one torch thread) as the leader would, and the combine order
does not depend on who answered.

The leader keeps every expert's weights as loaded (its `LocalExperts` banks). They are what it computes its
own share with, what it copies to a worker that takes an expert, and the backup a lost worker's experts are
restored from: when a worker dies (or misses its deadline) during a layer, the dispatcher gives its experts
to the leader, recomputes that share of the layer from the leader's copy (a layer's experts have no side
effects, so this re-runs exactly the part of the step that was lost) and reports the loss, so that the
instance repairs the EP size onto a replacement worker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol

import numpy as np
import torch

from instance.ep.placement import LEADER, Key, Placement, rank_loads
from instance.model.experts import ExpertOutput, Experts, LocalExperts, Routing
from instance.model.moe import SparseMoE

log = logging.getLogger(__name__)

LOAD_DECAY = 0.98          # per layer call: the observed load is a moving average over ~50 steps


class WorkerLost(RuntimeError):
    pass


class PendingRun(Protocol):
    def result(self) -> dict[int, np.ndarray]: ...


class WorkerHandle(Protocol):
    """How the dispatcher reaches one expert worker (rpc.expert.ExpertWorkerClient on Ray)."""

    name: str

    def run(self, layer: int, inputs: dict[int, np.ndarray]) -> PendingRun: ...


class DispatchedExperts(Experts):
    """One layer's experts, wherever the placement puts them."""

    def __init__(self, dispatcher: "ExpertDispatcher", layer: int, num_experts: int):
        super().__init__()
        self._dispatcher = [dispatcher]     # a list: not a submodule
        self.layer = layer
        self.num_experts = num_experts

    def owned(self) -> list[int]:
        return list(range(self.num_experts))

    def forward(self, x: torch.Tensor, routing: Routing) -> list[ExpertOutput]:
        return self._dispatcher[0].run_layer(self.layer, x, routing)


class ExpertDispatcher:
    def __init__(self, blocks: dict[int, SparseMoE], on_lost: Callable[[str, str], None] | None = None,
                 is_lost: Callable[[BaseException], bool] = lambda e: True):
        """Takes over the `experts` of every block (which must still be the loaded `LocalExperts`).
        `on_lost(rank, why)` is called (from the engine thread) when a worker is lost; `is_lost(error)` says
        whether a failed call means the worker is gone (else the error propagates)."""
        if not blocks:
            raise ValueError("expert parallelism needs an MoE model; this one has no MoE layers")
        self.banks: dict[int, LocalExperts] = {}
        for layer, block in blocks.items():
            if not isinstance(block.experts, LocalExperts):
                raise RuntimeError(f"moe: layer {layer}'s experts are already placed elsewhere")
            self.banks[layer] = block.experts
            block.experts = DispatchedExperts(self, layer, block.moe.num_experts)
        self.layers = sorted(blocks)
        self.num_experts = next(iter(blocks.values())).moe.num_experts
        self.placement = Placement.on_leader(self.layers, self.num_experts)
        self.workers: dict[str, WorkerHandle] = {}
        self.generation = 0                 # bumped by every change of placement
        self._owners = self._owner_table(self.placement)
        self._on_lost, self._is_lost = on_lost, is_lost
        self.load = {l: np.zeros(self.num_experts) for l in self.layers}
        self.remote_calls = 0
        self.remote_wait_s = 0.0            # time the leader waited on remote ranks after its own share
        self.layer_calls = 0
        self.lost: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    # ----- placement --------------------------------------------------------------------------------------
    @property
    def ep_size(self) -> int:
        return 1 + len(self.workers)

    def _owner_table(self, placement: Placement) -> dict[int, dict[int, str]]:
        return {l: placement.layer_owners(l) for l in self.layers}

    def switch(self, placement: Placement, workers: dict[str, WorkerHandle], generation: int) -> None:
        """Serve with this placement from the next layer call on. Call between two steps. Refused if the
        placement changed since `generation` (a worker was lost meanwhile)."""
        placement.check(self.layers, self.num_experts)
        missing = [r for r in placement.ranks() if r != LEADER and r not in workers]
        if missing:
            raise ValueError(f"placement names ranks with no worker: {missing}")
        with self._lock:
            if generation != self.generation:
                raise WorkerLost("the placement changed during the copy (an expert worker was lost)")
            self.placement, self.workers = placement, dict(workers)
            self._owners = self._owner_table(placement)
            self.generation += 1

    def observed_load(self) -> dict[Key, float]:
        return {(l, e): float(v) for l, arr in self.load.items() for e, v in enumerate(arr)}

    def rank_loads(self) -> dict[str, float]:
        return rank_loads(self.placement, self.observed_load())

    def remote_ms_per_layer(self) -> float:
        return 1000.0 * self.remote_wait_s / self.remote_calls if self.remote_calls else 0.0

    # ----- one layer --------------------------------------------------------------------------------------
    def run_layer(self, layer: int, x: torch.Tensor, routing: Routing) -> list[ExpertOutput]:
        groups = routing.groups()
        owners = self._owners[layer]
        counts = np.zeros(self.num_experts)
        for e, (rows, _) in groups.items():
            counts[e] = len(rows)
        self.load[layer] = self.load[layer] * LOAD_DECAY + counts
        self.layer_calls += 1
        by_rank: dict[str, list[int]] = {}
        for e in groups:
            by_rank.setdefault(owners[e], []).append(e)
        pending: list[tuple[str, list[int], Any]] = []
        for rank, experts in by_rank.items():
            if rank == LEADER:
                continue
            inputs = {e: x[groups[e][0]].numpy() for e in experts}
            try:
                pending.append((rank, experts, self.workers[rank].run(layer, inputs)))
            except Exception as err:  # noqa: BLE001 - classified by is_lost
                self._lose(rank, err)
                pending.append((LEADER, experts, None))
        outputs = self._local(layer, by_rank.get(LEADER, []), x, routing)
        for rank, experts, call in pending:
            if call is None:
                outputs += self._local(layer, experts, x, routing)
                continue
            started = time.perf_counter()
            try:
                ys = call.result()
            except Exception as err:  # noqa: BLE001 - classified by is_lost
                self._lose(rank, err)
                outputs += self._local(layer, experts, x, routing)
                continue
            finally:
                self.remote_wait_s += time.perf_counter() - started
                self.remote_calls += 1
            for e in experts:
                rows, slots = groups[e]
                y = torch.from_numpy(np.array(ys[e]))
                outputs.append(ExpertOutput(e, rows, y.float() * routing.weights[rows, slots, None]))
        return outputs

    def _local(self, layer: int, experts: list[int], x: torch.Tensor, routing: Routing) -> list[ExpertOutput]:
        groups, bank, outputs = routing.groups(), self.banks[layer], []
        for e in experts:
            rows, slots = groups[e]
            y = bank.expert(e)(x[rows])
            outputs.append(ExpertOutput(e, rows, y.float() * routing.weights[rows, slots, None]))
        return outputs

    def _lose(self, rank: str, err: BaseException) -> None:
        """The worker `rank` is gone: the leader serves its experts from now on (from its own copy)."""
        if not self._is_lost(err):
            raise err
        with self._lock:
            if rank not in self.workers:
                return
            owner = {k: (LEADER if r == rank else r) for k, r in self.placement.owner.items()}
            moved = sum(1 for r in self.placement.owner.values() if r == rank)
            self.placement = Placement(owner)
            gone = self.workers[rank]
            self.workers = {n: w for n, w in self.workers.items() if n != rank}
            self._owners = self._owner_table(self.placement)
            self.generation += 1
        if hasattr(gone, "kill"):            # a worker that missed its deadline may still run: stop it
            gone.kill()
        why = f"{type(err).__name__}: {err}"
        self.lost.append((rank, why))
        log.warning("expert worker %s lost (%s); the leader serves its %d experts from its own copy until it "
                    "is replaced", rank, why, moved)
        if self._on_lost is not None:
            self._on_lost(rank, why)
