"""Routed experts: who computes them, and the combine step that makes placement invisible.

An MoE layer routes each token to k experts (`Routing`). Computing the experts is behind one seam, `Experts`:
an nn.Module whose `forward(x, routing)` returns one `ExpertOutput` per expert it owns that got tokens, the
expert's output for those tokens already multiplied by their routing weights, in float32. `LocalExperts` owns
experts in this process; `ShardedExperts` splits one layer's experts among several owners (the local stand-in
for an expert-parallel dispatcher, which would send rows to remote owners instead).

Why the result never depends on placement:
- the rows an expert sees are fixed by the routing alone (the tokens routed to it, in batch order), so its
  matrix products have the same shapes and inputs wherever it runs;
- `combine` adds the experts' contributions one expert at a time in ascending expert id, in float32, whatever
  order the owners answered in. A token's sum therefore has the same terms in the same order under any split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from instance.model.exact import Linear


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x): the dense MLP of the Llama family, and one routed or shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class Routing:
    """Where each token of a batch goes: `ids` [T, k] long (distinct per row), `weights` [T, k] float32."""

    ids: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    _groups: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    def groups(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """expert id -> (rows, slots): the tokens routed to it in ascending row order, and which of their k
        choices it was. Only experts that got tokens appear, in ascending id. Computed once per routing."""
        if self._groups is None:
            k = self.ids.shape[1]
            flat = self.ids.reshape(-1)
            order = torch.argsort(flat, stable=True)          # stable: rows stay ascending within an expert
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            self._groups = {}
            for expert, positions in enumerate(torch.split(order, counts)):
                if counts[expert]:
                    self._groups[expert] = (positions // k, positions % k)
        return self._groups


@dataclass
class ExpertOutput:
    """One expert's weighted output for the tokens routed to it."""

    expert: int
    rows: torch.Tensor          # [n] long: rows of the batch, ascending
    values: torch.Tensor        # [n, hidden] float32: routing weight * expert(x[rows])


class Experts(nn.Module):
    """The seam: an owner of some of one layer's experts. Subclasses implement `owned` and `forward`."""

    def owned(self) -> list[int]:
        """The expert ids this owner computes, ascending."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, routing: Routing) -> list[ExpertOutput]:
        raise NotImplementedError


class LocalExperts(Experts):
    """Experts held in this process. The modules are shared, not copied, when one bank is split."""

    def __init__(self, experts: dict[int, nn.Module]):
        super().__init__()
        self.bank = nn.ModuleDict({str(e): experts[e] for e in sorted(experts)})
        self._ids = sorted(experts)

    def owned(self) -> list[int]:
        return list(self._ids)

    def expert(self, expert_id: int) -> nn.Module:
        return self.bank[str(expert_id)]

    def forward(self, x: torch.Tensor, routing: Routing) -> list[ExpertOutput]:
        outputs = []
        groups = routing.groups()
        for e in self._ids:
            if e not in groups:
                continue
            rows, slots = groups[e]
            y = self.bank[str(e)](x[rows])
            outputs.append(ExpertOutput(e, rows, y.float() * routing.weights[rows, slots, None]))
        return outputs


class ShardedExperts(Experts):
    """One layer's experts split among several owners, each expert owned exactly once."""

    def __init__(self, owners: list[Experts], num_experts: int):
        super().__init__()
        ids = [e for owner in owners for e in owner.owned()]
        if sorted(ids) != list(range(num_experts)):
            raise ValueError(f"experts: the owners must hold each of the {num_experts} experts exactly once; "
                             f"they hold {sorted(ids)}")
        self.owners = nn.ModuleList(owners)

    def owned(self) -> list[int]:
        return sorted(e for owner in self.owners for e in owner.owned())

    def forward(self, x: torch.Tensor, routing: Routing) -> list[ExpertOutput]:
        return [out for owner in self.owners for out in owner(x, routing)]


def split(experts: LocalExperts, groups: list[list[int]]) -> ShardedExperts:
    """The same expert modules, owned by len(groups) LocalExperts (no weights are copied)."""
    owners = [LocalExperts({e: experts.expert(e) for e in group}) for group in groups]
    return ShardedExperts(owners, num_experts=len(experts.owned()))


def combine(routing: Routing, outputs: list[ExpertOutput], hidden_size: int) -> torch.Tensor:
    """Sum the weighted expert outputs per token, [T, hidden] float32, adding experts in ascending id.

    Every expert that got tokens must have answered exactly once: a missing owner would silently drop terms,
    so it is an error here rather than a wrong token later.
    """
    answered = sorted(o.expert for o in outputs)
    routed = list(routing.groups())
    if answered != routed:
        raise RuntimeError(f"experts: routed to experts {routed} but got outputs from {answered}; the expert "
                           f"placement does not cover this layer's experts exactly once")
    out = torch.zeros(routing.ids.shape[0], hidden_size, dtype=torch.float32, device=routing.ids.device)
    for o in sorted(outputs, key=lambda o: o.expert):
        out.index_add_(0, o.rows, o.values)
    return out
